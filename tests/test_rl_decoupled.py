"""Decoupled rollout ranks (issue 15 item 2) on gloo CPU ranks: 1 trainer + 1 rollout rank, and 2 FSDP2 trainers + 1.

One 2-rank launch runs a bad layout, a max_staleness 0 run for 2 steps resumed to step 3, a max_staleness 1 run, and
a max_staleness 1 run whose rollout rank raises at step 1 (the trainer then waits in the broadcast of the weights
step 2 would have sampled: the failing rank joins it, so both stop with its line), and one whose trainer raises in
step 1's update (the rollout rank, waiting for step 2's weights, stops with the trainer's line). One 3-rank launch runs a bad
layout and a max_staleness 0 run on 2 trainer ranks. A second 2-rank launch runs DAPO with refill rounds and C3PO++
on the rollout rank (`test_c3po_and_dapo_refills_on_a_rollout_rank`). The single-process runs happen in the test
process.

With S = 0 the rollout rank samples from the weights the single process samples from, so rewards, losses and final
weights are equal (at 1e-5, the colocated test's tolerance: with one trainer they are equal, with two the FSDP2
average sums in another order; at lr 1e-4, see that test). With S = 1 the recorded versions bound the lag of every
trained token; the trainers check every sync's digest against the rollout rank's (a mismatch stops the run: checked
on a forged message), and the bucketed broadcast is checked directly on models that start different.
"""

import functools
import json

import pytest
import torch
import torch.distributed as dist
from dist_utils import requires_gloo, run_on_ranks
from safetensors.torch import load_file
from test_rl_trainer import rl_config, start  # noqa: F401 - the module fixture: a tiny start checkpoint

import linglab.rl.report
from linglab.config import ConfigError, load_config
from linglab.errors import LinglabError
from linglab.model import build_model
from linglab.parallel.parallel_dims import ParallelDims
from linglab.parallel.weight_sync import broadcast_weights, weights_digest
from linglab.rl import trainer as trainer_module
from linglab.rl.decoupled import RolloutLink, TrainerEnd, finish_sends, send_message
from linglab.rl.rollout import RolloutEngine
from linglab.rl.trainer import RLTrainer, rollout_rewards, run_rl

pytestmark = requires_gloo
OPTIONS = dict(kl_coef=0.1, lr=1e-4, rollout_ranks=1)
TOL = 1e-5
# Carry-overs happen (tests/test_rl_trainer.py's C3PO++ settings): a 30-token budget, 12 rollouts in flight.
C3PO = dict(c3po=True, c3po_capacity=12, c3po_budget=30, c3po_max_retention=1)
DAPO = dict(algo="dapo", dapo_max_rounds=2, steps=3)


def _fail_at_step_one(original):
    def generate_groups(self, prompts, group_size, seed, step=0, *args, **kwargs):
        if step == 1:
            raise ValueError("injected failure")
        return original(self, prompts, group_size, seed, step, *args, **kwargs)
    return generate_groups


def _fail_at_step_one_update(original):
    def update(self, scored):
        if self.step == 1:
            raise ValueError("injected trainer failure")
        return original(self, scored)
    return update


def _decoupled(rank, world_size, ckpt, root):
    linglab.rl.report.write_rl_report = lambda run_dir: run_dir / "report.md"  # plots are not what is compared
    model = build_model(load_config("tiny").model)  # a different init on each rank (spawn seeds alike: perturb)
    if rank:
        for p in model.parameters():
            p.data.add_(1.0)
    sent = broadcast_weights(model.state_dict(), src=0, bucket_bytes=4096)
    digests = [None, None]
    dist.all_gather_object(digests, weights_digest(model.state_dict()))
    assert digests[0] == digests[1] and sent > 4096
    link = RolloutLink(rank, world_size, 1, 0, 1, 1, 1, torch.device("cpu"), None)  # a rollout rank that sampled stale
    if rank == 1:
        forged = {"version": 1, "digest": "stale", "drawn": 0, "pool": None, "work": {}, "groups": []}
        finish_sends(send_message(forged, 0, 99, link.device))
    else:
        trainer = TrainerEnd(link, ParallelDims())
        trainer.digests[1] = "broadcast"
        with pytest.raises(RuntimeError, match=r"rollout rank 1 sampled step 99 from weights that differ"):
            trainer.receive(99, lambda n: [])

    assert not (root / "bad").exists()
    run_rl(rl_config(**OPTIONS, steps=2), ckpt, root / "s0")
    run_rl(rl_config(**OPTIONS, steps=3), None, root / "s0", resume=True)
    run_rl(rl_config(**OPTIONS, max_staleness=1), ckpt, root / "s1")
    generate_groups = RolloutEngine.generate_groups
    if rank == 1:
        RolloutEngine.generate_groups = _fail_at_step_one(generate_groups)
    with pytest.raises(LinglabError, match=r"^rl: rollout rank 1 failed at step 1: ValueError: injected failure$"):
        run_rl(rl_config(**OPTIONS, max_staleness=1), ckpt, root / "broken")  # fails before the trainer's 2nd sync
    RolloutEngine.generate_groups = generate_groups
    if rank == 0:  # the trainer fails in step 1's update, the rollout rank then waits for the weights of step 2
        RLTrainer.update = _fail_at_step_one_update(RLTrainer.update)
        with pytest.raises(ValueError, match="injected trainer failure"):
            run_rl(rl_config(**OPTIONS, max_staleness=1), ckpt, root / "trainer-broken")
    else:
        with pytest.raises(LinglabError, match=r"^rl: rollout rank 1 stops: trainer rank 0 failed at step 1: "
                                               r"ValueError: injected trainer failure$"):
            run_rl(rl_config(**OPTIONS, max_staleness=1), ckpt, root / "trainer-broken")


def _two_trainers(rank, world_size, ckpt, root):
    linglab.rl.report.write_rl_report = lambda run_dir: run_dir / "report.md"
    with pytest.raises(LinglabError, match=r"rl.prompts_per_step=3 groups do not split evenly over 2 trainer ranks"):
        run_rl(rl_config(**OPTIONS, prompts_per_step=3), ckpt, root / "bad")
    with pytest.raises(LinglabError, match=r"rl.c3po with rl.rollout_ranks runs on 1 trainer \+ 1 rollout rank for now"):
        run_rl(rl_config(**OPTIONS, **C3PO), ckpt, root / "bad")
    with pytest.raises(LinglabError, match=r"DAPO refill rounds \(rl.dapo_max_rounds=2\) with rl.rollout_ranks run on 1 "):
        run_rl(rl_config(**OPTIONS, **DAPO), ckpt, root / "bad")
    run_rl(rl_config(**OPTIONS), ckpt, root / "t2")


def _train_rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"train"' in line]


def test_one_trainer_and_one_rollout_rank(start, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setattr(linglab.rl.report, "write_rl_report", lambda run_dir: run_dir / "report.md")
    with pytest.raises(LinglabError, match=r"^rl: rl.rollout_ranks=1 leaves no trainer among 1 rank\(s\)"):
        run_rl(rl_config(**OPTIONS), start, tmp_path / "bad")
    with pytest.raises(ConfigError, match=r"^config: rl.max_staleness \(1\) needs rl.rollout_ranks > 0"):
        rl_config(max_staleness=1)
    assert not (tmp_path / "bad").exists()
    run_rl(rl_config(**{**OPTIONS, "rollout_ranks": 0}), start, tmp_path / "single")
    run_on_ranks(functools.partial(_decoupled, ckpt=start, root=tmp_path), tmp_path, world_size=2)
    (tmp_path / "three").mkdir()
    run_on_ranks(functools.partial(_two_trainers, ckpt=start, root=tmp_path), tmp_path / "three", world_size=3)

    single, s0, s1 = (_train_rows(tmp_path / run) for run in ("single", "s0", "s1"))
    assert [r["step"] for r in s0] == [1, 2, 3]
    for run in ("s0", "t2"):  # 1 trainer + 1 rollout rank (resumed at step 2), 2 FSDP2 trainers + 1 rollout rank
        for one, two in zip(single, _train_rows(tmp_path / run), strict=True):
            assert one["response_tokens"] == two["response_tokens"] and two["groups_sampled"] == 2
            for key in ("reward", "loss", "kl", "grad_norm", "entropy", "response_length"):
                assert two[key] == pytest.approx(one[key], abs=TOL, rel=TOL), (run, key)
            assert two["staleness_max"] == 0 and two["sync_bytes"] == one["sync_bytes"] > 0
        ours, theirs = (load_file(tmp_path / name / "final" / "model.safetensors") for name in (run, "single"))
        for name, tensor in theirs.items():
            torch.testing.assert_close(ours[name], tensor, atol=TOL, rtol=0, msg=f"{run}: {name}")

    # S = 1: step 0 samples the start, every later step the weights one step old; the last ones are never sent.
    assert [r["staleness_max"] for r in s1] == [0, 1, 1]
    assert all(r["staleness_mean"] == r["staleness_max"] for r in s1)
    assert [r["sync_bytes"] > 0 for r in s1] == [True, True, False]
    assert s1[0]["reward"] == single[0]["reward"]
    assert not (tmp_path / "broken" / "final").exists()


def _record_lags(original, path):
    """RLTrainer._staleness, also writing (step, per trained group: the lags of its oldest and newest token, its
    carry-overs)."""
    def staleness(self, rollouts, keep):
        size, rows = self.cfg.group_size, []
        for first in range(0, len(rollouts), size):
            group = [r for r, k in zip(rollouts[first:first + size], keep[first:first + size].tolist()) if k]
            versions = [v for r in group for v in r.versions]
            if versions:
                rows.append((self.step, self.step + 1 - min(versions), self.step + 1 - max(versions),
                             max(r.retained for r in group)))
        with open(path, "a") as f:
            f.write(json.dumps(rows) + "\n")
        return original(self, rollouts, keep)
    return staleness


def _multiple_of_three_is_right(cfg, completions, answers, lengths, kind="numeric"):
    """The random model is never right: a scripted verdict, so that DAPO finds some groups all wrong and refills."""
    return (lengths % 3 == 0).float(), lengths % 3 == 0, {}


def _decoupled_c3po_and_dapo(rank, world_size, ckpt, root):
    linglab.rl.report.write_rl_report = lambda run_dir: run_dir / "report.md"
    trainer_module.rollout_rewards = _multiple_of_three_is_right  # both ranks: the rollout rank scores to refill
    run_rl(rl_config(**OPTIONS, **DAPO), ckpt, root / "dapo-s0")
    trainer_module.rollout_rewards = rollout_rewards
    run_rl(rl_config(**OPTIONS, **C3PO, steps=2), ckpt, root / "c3po-s0")
    run_rl(rl_config(**OPTIONS, **C3PO, steps=3), None, root / "c3po-s0", resume=True)  # the pool comes back
    if rank == 0:
        RLTrainer._staleness = _record_lags(RLTrainer._staleness, root / "lags.jsonl")
    run_rl(rl_config(**OPTIONS, **C3PO, steps=4, max_staleness=1), ckpt, root / "c3po-s1")


def test_c3po_and_dapo_refills_on_a_rollout_rank(start, tmp_path, monkeypatch):  # noqa: F811
    """DAPO's refill rounds on the rollout rank (which scores its groups to find the mixed ones): S = 0 equals one
    process, refills included. C3PO++ with the pool on the rollout rank (on more than 1 + 1 ranks refused, in the
    3-rank launch): S = 0 equals one process (the pool's state travels with the checkpoint the trainer writes, so a
    resume between steps 2 and 3 changes nothing). S = 1 (AReaL's head lag, as SPEC §9 has it: partial rollouts
    span versions): every trained group's newest token is at most 1 version old and its oldest at most 1 + the
    group's carry-overs; carried groups do train."""
    monkeypatch.setattr(linglab.rl.report, "write_rl_report", lambda run_dir: run_dir / "report.md")
    run_rl(rl_config(**{**OPTIONS, "rollout_ranks": 0}, **C3PO), start, tmp_path / "c3po-single")
    with monkeypatch.context() as patch:
        patch.setattr(trainer_module, "rollout_rewards", _multiple_of_three_is_right)
        run_rl(rl_config(**{**OPTIONS, "rollout_ranks": 0}, **DAPO), start, tmp_path / "dapo-single")
    run_on_ranks(functools.partial(_decoupled_c3po_and_dapo, ckpt=start, root=tmp_path), tmp_path, world_size=2)

    dapo, dapo_s0 = _train_rows(tmp_path / "dapo-single"), _train_rows(tmp_path / "dapo-s0")
    assert any(r["dapo_rounds"] for r in dapo), "a step with a refill round"
    for one, two in zip(dapo, dapo_s0, strict=True):
        for key in ("dapo_rounds", "groups_sampled", "groups_trained", "response_tokens", "reward", "loss", "grad_norm"):
            assert two[key] == one[key], key
    ours, theirs = (load_file(tmp_path / name / "final" / "model.safetensors") for name in ("dapo-s0", "dapo-single"))
    assert all(torch.equal(ours[name], tensor) for name, tensor in theirs.items())

    single, s0, s1 = (_train_rows(tmp_path / run) for run in ("c3po-single", "c3po-s0", "c3po-s1"))
    assert [r["step"] for r in s0] == [1, 2, 3]
    for one, two in zip(single, s0, strict=True):
        for key in ("response_tokens", "groups_sampled", "tokens_generated", "completed_tokens", "resumed_rollouts",
                    "carried_groups", "purged_groups", "stale_token_fraction", "reward", "loss", "kl", "grad_norm",
                    "staleness_max", "prefill_tokens"):
            assert two[key] == one[key], key
    assert any(r["carried_groups"] for r in single) and any(r["stale_token_fraction"] > 0 for r in single)
    ours, theirs = (load_file(tmp_path / name / "final" / "model.safetensors") for name in ("c3po-s0", "c3po-single"))
    assert all(torch.equal(ours[name], tensor) for name, tensor in theirs.items())

    lags = [row for line in (tmp_path / "lags.jsonl").read_text().splitlines() for row in json.loads(line)]
    assert [r["step"] for r in s1] == [1, 2, 3, 4] and {step for step, *_ in lags} == {0, 1, 2, 3}
    assert all(newest <= 1 and oldest <= 1 + retained for _, oldest, newest, retained in lags)
    assert any(retained and oldest == 2 for _, oldest, _, retained in lags), "a carried rollout trained at lag 2"
    assert max(r["staleness_max"] for r in s1) == 2
