"""Rollouts (SPEC §5): fp8 vs fp32 rollout precision (FP8 weights and activations), EOS as a trained token, C3PO++
groups, budget, carry-over, resume after sync, purge."""

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config

from linglab.checkpoint import dequantize_hf_state_dict, load_state_into, to_hf_state_dict
from linglab.fp8 import TILE, dequantize_blockwise, dequantize_tilewise, quantize_blockwise, quantize_tilewise
from linglab.fp8_convert import fp8_weight_names
from linglab.model import build_model
from linglab.rl.losses import grpo_loss
from linglab.rl.rollout import Rollout, RolloutEngine, RolloutPool, start_groups
from linglab.rl.trainer import policy_logprobs, rollout_batch

EOS = 0
PAD = 1


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    # A larger init than pretraining's 0.006 spreads the logits, as a trained model's are.
    return build_model(tiny_config(num_hidden_layers=2, initializer_range=0.05).model, seed=0)


@pytest.fixture(scope="module")
def hybrid():
    """The same as a Ring-linear hybrid (SPEC §8): layer 0 linear (its state in the mixed cache), layer 1 softmax."""
    return build_model(tiny_config(num_hidden_layers=2, initializer_range=0.05, layer_group_size=2,
                                   group_norm_size=2).model, seed=0)


both_families = pytest.mark.parametrize("family", ["model", "hybrid"])


def prompts_of(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 512, (n,), generator=g).tolist() for n in lengths]


def mismatch(model, precision):
    """|log pi_train - log pi_infer| over the response tokens of 3 groups of 2 rollouts."""
    engine = RolloutEngine(model.cfg, EOS, max_new_tokens=10, precision=precision)
    engine.sync_weights(model)
    groups = engine.generate_groups(prompts_of([4, 6, 4]), 2, seed=0)
    assert [len(g.rollouts) for g in groups] == [2, 2, 2] and all(g.done for g in groups)
    rollouts = [r for g in groups for r in g.rollouts]
    assert all(len(r.logprobs) == len(r.tokens) == len(r.versions) for r in rollouts)
    batch = rollout_batch(rollouts, PAD)
    with torch.no_grad():
        train_logp, _ = policy_logprobs(model, batch, temperature=1.0)
    return (train_logp - batch.infer_logp).abs()[batch.mask]


@both_families
def test_fp32_rollouts_match_the_trainer_and_fp8_rollouts_do_not(family, request):
    model = request.getfixturevalue(family)
    assert mismatch(model, "fp32").max() < 1e-4
    fp8 = mismatch(model, "fp8")
    assert fp8.mean() > 1e-3, "fp8 rollout weights must change pi_infer"


def test_sync_copies_into_a_separate_model_and_fp8_quantises_only_the_gemm_weights(model):
    engine = RolloutEngine(model.cfg, EOS, max_new_tokens=4, precision="fp8")
    engine.sync_weights(model)
    assert engine.version == 1 and engine.model is not model
    rollout, train = engine.model.model.layers[1], model.model.layers[1]
    assert not torch.equal(rollout.attention.query_key_value.weight, train.attention.query_key_value.weight)
    assert not torch.equal(rollout.mlp.experts.gate_up_proj, train.mlp.experts.gate_up_proj)
    assert torch.equal(engine.model.model.word_embeddings.weight, model.model.word_embeddings.weight)
    assert torch.equal(engine.model.lm_head.weight, model.lm_head.weight)
    assert torch.equal(rollout.mlp.gate.weight, train.mlp.gate.weight)


def test_eos_is_a_trained_token_with_the_logprob_it_was_sampled_with():
    model = build_model(tiny_config(num_hidden_layers=2, initializer_range=0.05).model, seed=0)
    with torch.no_grad():  # EOS likely at every step: some responses end, some are truncated
        model.model.word_embeddings.weight[:, 0] = 1.0
        model.lm_head.weight[EOS, 0] = 2.5
    engine = RolloutEngine(model.cfg, EOS, max_new_tokens=6, precision="fp32")
    engine.sync_weights(model)
    groups = engine.generate_groups(prompts_of([4, 5, 4, 6]), 4, seed=2)  # a seed with both endings
    rollouts = [r for g in groups for r in g.rollouts]
    ended, truncated = [r for r in rollouts if r.eos], [r for r in rollouts if r.truncated]
    assert ended and truncated and len(ended) + len(truncated) == len(rollouts)
    for r in rollouts:
        assert len(r.tokens) == len(r.logprobs) == len(r.versions) == r.cost
        assert EOS not in r.text_tokens and r.tokens[-1:] == ([EOS] if r.eos else r.tokens[-1:])
    assert all(len(r.tokens) == 6 and EOS not in r.tokens for r in truncated)

    batch = rollout_batch(rollouts, PAD)
    for b, r in enumerate(rollouts):  # the loss mask covers every sampled token, EOS included, with its log pi_infer
        assert batch.targets[b][batch.mask[b]].tolist() == r.tokens
        assert torch.equal(batch.infer_logp[b][batch.mask[b]], torch.tensor(r.logprobs))

    logits = model(batch.inputs)
    logits.retain_grad()
    logp = torch.log_softmax(logits, -1).gather(-1, batch.targets[..., None]).squeeze(-1)
    torch.testing.assert_close(logp[batch.mask], batch.infer_logp[batch.mask], rtol=1e-4, atol=1e-4)  # fp32: same policy
    grpo_loss(logp, logp.detach(), torch.ones(len(rollouts)), batch.mask).backward()
    for b, r in enumerate(rollouts):
        last = int(batch.mask[b].nonzero().max())  # the position that predicts the response's last token
        eos_grad = logits.grad[b, last, EOS]
        # A positive advantage raises the sampled EOS (the loss falls as its logit rises); a truncated row's last
        # target is an ordinary token, whose gain lowers EOS.
        assert (eos_grad < 0) if r.eos else (eos_grad > 0)
        assert batch.mask[b].sum() == len(r.tokens)


@both_families
def test_fp8_rollouts_quantise_the_activations_of_every_fp8_gemm_too(family, request):
    model = request.getfixturevalue(family)
    engine = RolloutEngine(model.cfg, EOS, max_new_tokens=4, precision="fp8")
    engine.sync_weights(model)
    weight_only = build_model(model.cfg)  # the FP8 export's weights in a plain model: what rollouts used to run
    load_state_into(weight_only, dequantize_hf_state_dict(to_hf_state_dict(model, fp8=True), TILE, "test"), "test")
    assert all(torch.equal(a, b) for a, b in zip(engine.model.parameters(), weight_only.parameters(), strict=True))
    ids = torch.tensor(prompts_of([12, 12]))
    with torch.no_grad():
        fp8, weights, train = engine.model(ids), weight_only(ids), model(ids)
    assert (fp8 - weights).abs().max() > 1e-3 and (weights - train).abs().max() > 1e-3
    converted = {name for name, layer in engine.model.named_modules() if type(layer).__name__.startswith("Fp8Inference")}
    assert {f"{name}.{param}" for name in converted for param, _ in
            dict(engine.model.named_modules())[name].named_parameters()} == set(fp8_weight_names(model))

    g = torch.Generator().manual_seed(0)
    layer, x = engine.model.model.layers[1].attention.query_key_value, torch.randn(2, 5, 128, generator=g)
    w = dequantize_blockwise(*quantize_blockwise(model.model.layers[1].attention.query_key_value.weight.detach()))
    assert torch.equal(layer.weight, w)
    with torch.no_grad():
        assert torch.equal(layer(x), dequantize_tilewise(*quantize_tilewise(x)) @ w.T)

    experts, counts = engine.model.model.layers[1].mlp.experts, torch.tensor([3, 0, 5] + [1] * 13)
    x, routing = torch.randn(int(counts.sum()), 128, generator=g), torch.rand(int(counts.sum()), generator=g)
    reference, start = [], 0
    for e, n in enumerate(counts.tolist()):  # one expert at a time: tile-quantised input, its SwiGLU, then down
        xe = dequantize_tilewise(*quantize_tilewise(x[start:start + n]))
        gate, up = (xe @ experts.gate_up_proj[e].T).chunk(2, dim=-1)
        h = F.silu(gate) * up * routing[start:start + n, None]
        reference.append(dequantize_tilewise(*quantize_tilewise(h)) @ experts.down_proj[e].T)
        start += n
    with torch.no_grad():
        torch.testing.assert_close(experts(x, routing, counts), torch.cat(reference), rtol=1e-6, atol=1e-6)


def test_an_fp32_engine_is_the_trainer_bit_for_bit(model):
    engine = RolloutEngine(model.cfg, EOS, max_new_tokens=4, precision="fp32")
    engine.sync_weights(model)
    assert all(type(m).__module__ != "linglab.fp8_convert" for m in engine.model.modules())
    ids = torch.tensor(prompts_of([12, 12]))
    with torch.no_grad():
        assert torch.equal(engine.model(ids), model(ids))


class StubEngine:
    """Stands in for RolloutEngine on a pool whose payloads are the G response lengths of each group: one token
    per step for every active rollout, EOS the step after its length; token 7 (and EOS) with log-prob -version marks
    the version that sampled it. Like the engine, it asks `stop()` after every step."""

    def __init__(self, pool, max_new_tokens=100):
        self.pool, self.version, self.max_new_tokens, self.steps = pool, 0, max_new_tokens, 0
        self.device = torch.device("cpu")

    def continue_rollouts(self, rollouts, stop=None):
        assert len(rollouts) <= self.pool.capacity
        target = {id(r): n for g in self.pool.groups for r, n in zip(g.rollouts, g.payload, strict=True)}
        active, sampled = [r for r in rollouts if not r.done], 0
        while any(not r.done for r in active):
            self.steps += 1
            for r in (r for r in active if not r.done):
                sampled += 1
                if len(r.tokens) == target[id(r)]:
                    r.tokens.append(EOS)
                    r.logprobs.append(-float(self.version))
                    r.versions.append(self.version)
                    r.eos = True
                    continue
                r.tokens.append(7)
                r.logprobs.append(-float(self.version))
                r.versions.append(self.version)
                r.truncated = len(r.tokens) >= self.max_new_tokens
            if stop is not None and stop():
                break
        return sampled


def source(lengths_per_group):
    """new_prompts(n) for the pool: groups whose payload is their responses' lengths, until the list runs out."""
    queue = list(lengths_per_group)
    return lambda n: [([2, 3], queue.pop(0)) for _ in range(min(n, len(queue)))]


def test_c3po_returns_only_complete_groups_within_capacity():
    lengths = torch.randint(0, 30, (40, 4), generator=torch.Generator().manual_seed(0)).tolist()
    pool = RolloutPool(capacity=12, budget=60, max_retention=10, group_size=4)
    engine, new_prompts = StubEngine(pool), source(lengths)
    for _ in range(4):
        groups, stats = pool.collect(engine, new_prompts, seed=0, step=0)
        engine.version += 1
        assert groups and all(g.done and len(g.rollouts) == 4 for g in groups)
        assert stats["completed_tokens"] == sum(r.cost for g in groups for r in g.rollouts) >= 60
        assert all(not g.done for g in pool.groups), "a complete group left in the pool"


def test_c3po_budget_stops_generation_once_completed_tokens_reach_it():
    # Two groups end after 2 tokens + EOS and 6 + EOS. The first costs 2 x 3 = 6 tokens, done at step 3: a budget of 6
    # stops there (the other group carried over with 3 tokens each), a budget of 7 samples on until step 7.
    for budget, steps, finished in ((6, 3, 1), (7, 7, 2)):
        pool = RolloutPool(capacity=4, budget=budget, max_retention=5, group_size=2)
        engine = StubEngine(pool)
        groups, stats = pool.collect(engine, source([[2, 2], [6, 6]]), seed=0, step=0)
        assert engine.steps == steps and len(groups) == finished
        assert stats["completed_tokens"] >= budget
        assert [len(r.tokens) for g in pool.groups for r in g.rollouts] == ([3, 3] if finished == 1 else [])


def test_c3po_carries_unfinished_rollouts_over_and_purges_them_after_sigma():
    # One group never finishes (one member done after 1 token, the other running to 100); short groups meet the budget.
    pool = RolloutPool(capacity=4, budget=3, max_retention=2, group_size=2)
    engine, new_prompts = StubEngine(pool), source([[1, 100]] + [[1, 1]] * 10)
    for step in (1, 2):
        groups, stats = pool.collect(engine, new_prompts, seed=0, step=0)
        engine.version += 1
        assert [g.payload for g in groups] == [[1, 1]]
        (long,) = pool.groups
        assert long.payload == [1, 100] and [r.retained for r in long.rollouts] == [0, step]
        assert stats["purged_groups"] == 0 and stats["carried_groups"] == 1
    groups, stats = pool.collect(engine, new_prompts, seed=0, step=0)
    assert stats["purged_groups"] == 1 and pool.groups == []
    assert [g.payload for g in groups] == [[1, 1]]


@both_families
def test_a_carried_rollout_resumes_after_a_sync_from_its_tokens_keeping_its_logprobs(family, request):
    model = request.getfixturevalue(family)
    engine = RolloutEngine(model.cfg, EOS, max_new_tokens=12, precision="fp32")
    engine.sync_weights(model)
    pool = RolloutPool(capacity=4, budget=1, max_retention=3, group_size=2)
    prompts = iter([(p, None) for p in prompts_of([5, 5, 5, 5, 5, 5])])
    new_prompts = lambda n: [next(prompts) for _ in range(min(n, 1))]  # noqa: E731 - one new group per round

    # A group the previous step left unfinished: 4 tokens sampled by version 1, then the budget stopped sampling.
    (prompt, _), = new_prompts(1)
    (group,) = start_groups([prompt], [None], 2, seed=0, step=0, first_group=0)
    steps = iter(range(1, 100))
    assert engine.continue_rollouts(group.rollouts, stop=lambda: next(steps) == 4) == 8
    pool.groups.append(group)
    carried = [r for g in pool.groups for r in g.rollouts if r.tokens and not r.done]
    assert len(carried) == 2 and all(len(r.tokens) == 4 for r in carried)
    before = [(list(r.tokens), list(r.logprobs)) for r in carried]

    newer = build_model(model.cfg, seed=1)  # the next policy version: other weights
    engine.sync_weights(newer)
    pool.collect(engine, new_prompts, seed=0, step=1)
    for r, (tokens, logprobs) in zip(carried, before, strict=True):
        k = len(tokens)
        assert r.tokens[:k] == tokens and r.logprobs[:k] == logprobs  # bit-exact: recorded, never recomputed
        assert len(r.tokens) > k and set(r.versions[:k]) == {1} and set(r.versions[k:]) == {2}
        # The continuation was sampled by the new version, conditioned on the old partial tokens.
        batch = rollout_batch([r], PAD)
        with torch.no_grad():
            newer_logp, _ = policy_logprobs(newer, batch, temperature=1.0)
        torch.testing.assert_close(newer_logp[batch.mask][k:], torch.tensor(r.logprobs[k:]), rtol=1e-4, atol=1e-4)


def test_the_continuous_engine_samples_what_the_static_one_does(model):
    """Greedy groups, and a C3PO++-style stop after k token steps, give the same rollouts with either engine."""
    outcomes = []
    for kind in ("static", "continuous"):
        engine = RolloutEngine(model.cfg, EOS, max_new_tokens=10, precision="fp32", temperature=0.0, kind=kind, slots=8)
        engine.sync_weights(model)
        groups = engine.generate_groups(prompts_of([4, 6, 3]), 2, seed=0)
        partial = [Rollout(p) for p in prompts_of([5, 2, 7], seed=1)]
        steps = iter(range(1, 100))
        engine.continue_rollouts(partial, stop=lambda steps=steps: next(steps) == 3)
        outcomes.append(([(r.tokens, r.eos, r.truncated) for g in groups for r in g.rollouts],
                         [r.logprobs for g in groups for r in g.rollouts], [r.tokens for r in partial]))
    (tokens, logprobs, partial), (tokens_c, logprobs_c, partial_c) = outcomes
    assert tokens_c == tokens and partial_c == partial and all(len(t) == 3 for t in partial)
    for ours, theirs in zip(logprobs_c, logprobs):
        assert ours == pytest.approx(theirs, abs=1e-5)
    with pytest.raises(ValueError, match="rollout engine"):
        RolloutEngine(model.cfg, EOS, max_new_tokens=10, kind="paged")


@pytest.mark.parametrize("kind", ["static", "continuous"])
def test_a_group_samples_the_same_rollouts_alone_or_batched_with_others(model, kind):
    """Each rollout draws from its own generator (seed, step, group, member): a group's sampled rollouts do not depend
    on the batch it is sampled in, or on the rank that samples it."""
    engine = RolloutEngine(model.cfg, EOS, max_new_tokens=10, precision="fp32", top_p=0.9, kind=kind, slots=5)
    engine.sync_weights(model)
    short, target, long = prompts_of([3, 5, 9])
    alone = engine.generate_groups([target], 3, seed=7, step=2, first_group=1)
    batched = engine.generate_groups([short, target, long], 3, seed=7, step=2, first_group=0)
    assert [r.tokens for r in alone[0].rollouts] == [r.tokens for r in batched[1].rollouts]
    for ours, theirs in zip(alone[0].rollouts, batched[1].rollouts):
        assert ours.logprobs == pytest.approx(theirs.logprobs, abs=1e-5)
    assert len({tuple(r.tokens) for r in alone[0].rollouts}) > 1, "the members must draw different streams"
    other_step = engine.generate_groups([target], 3, seed=7, step=3, first_group=1)
    assert [r.tokens for r in other_step[0].rollouts] != [r.tokens for r in alone[0].rollouts]


class PerPromptLimit(RolloutEngine):
    """Each response as long as its prompt (as benchmarks/rl_system.py gives each its solution's length)."""

    def response_limit(self, rollout):
        return min(len(rollout.prompt), self.max_new_tokens)


@pytest.mark.parametrize("kind", ["static", "continuous"])
def test_a_per_prompt_response_limit_ends_each_rollout_there_and_c3po_counts_it_done(model, kind):
    engine = PerPromptLimit(model.cfg, [], max_new_tokens=9, precision="fp32", kind=kind, slots=6)
    engine.sync_weights(model)
    groups = engine.generate_groups(prompts_of([3, 12, 5]), 2, seed=0)
    assert [[(len(r.tokens), r.truncated, r.eos) for r in g.rollouts] for g in groups] == [
        [(3, True, False)] * 2, [(9, True, False)] * 2, [(5, True, False)] * 2]
    # C3PO++: the groups of 2 x 3 and 2 x 5 tokens complete; a budget of 16 stops before the 9-token group ends.
    pool = RolloutPool(capacity=6, budget=16, max_retention=2, group_size=2)
    prompts = iter([(p, len(p)) for p in prompts_of([3, 9, 5])])
    completed, stats = pool.collect(engine, lambda n: [next(prompts) for _ in range(n)], seed=0, step=0)
    assert [g.payload for g in completed] == [3, 5] and stats["completed_tokens"] == 16
    assert [len(r.tokens) for g in pool.groups for r in g.rollouts] == [5, 5]
