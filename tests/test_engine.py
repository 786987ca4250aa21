"""The continuous-batching engine (issue 15 item 3): the same greedy tokens as `generate` on mixed-length prompts
(softmax and hybrid models, fewer slots than prompts, shared prompts, EOS), sampled log-probs equal to the model's
own forward, and only real tokens counted."""

import pytest
import torch
import torch.nn.functional as F

from linglab.config import load_config
from linglab.generate import generate
from linglab.model import build_model
from linglab.rl.engine import ContinuousEngine


def requests(vocab: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 30, (9,), generator=g).tolist()
    prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]
    prompts += [prompts[0]] * 3  # a group: one prompt, several responses
    limits = torch.randint(1, 40, (len(prompts),), generator=g).tolist()
    return prompts, limits


@pytest.fixture(scope="module", params=["tiny", "tiny-linear"])
def model(request):
    return build_model(load_config(request.param).model, seed=0).eval()


@pytest.mark.parametrize("slots, prefill_tokens", [(3, 40), (16, 2048)])
def test_greedy_tokens_equal_generate(model, slots, prefill_tokens):
    prompts, limits = requests(model.cfg.vocab_size)
    reference = generate(model, prompts, limits, eos_id=0, temperature=0.0)
    # A stop id the greedy responses produce, so some end by EOS and free their slot early.
    stop = reference.tokens[1][2]
    reference = generate(model, prompts, limits, eos_id=stop, temperature=0.0)
    assert any(reference.finished) and not all(reference.finished)
    engine = ContinuousEngine(model, slots=slots, max_len=80, prefill_tokens=prefill_tokens)
    result = engine.run(prompts, limits, stop, 0.0)
    assert result.tokens == reference.tokens and result.finished == reference.finished
    assert result.eos_tokens == reference.eos_tokens
    for ours, theirs in zip(result.logprobs, reference.logprobs):
        assert ours == pytest.approx(theirs, abs=1e-5)
    # Real tokens only: no padding, and a prompt admitted several times at once is prefilled once (all 12 fit in one
    # admission with 16 slots; with 3, the group's copies arrive in later admissions); decode rows are live rows.
    unique = sum(len(p) for p in prompts[:-3])
    assert result.prefill_tokens == unique if slots == 16 else unique < result.prefill_tokens <= unique + 3 * len(prompts[0])
    assert result.decode_rows == sum(len(t) + int(f) - 1 for t, f in zip(result.tokens, result.finished))
    assert reference.prefill_tokens > result.prefill_tokens and reference.decode_rows > result.decode_rows


def test_sampled_logprobs_are_the_models(model):
    prompts, limits = requests(model.cfg.vocab_size, seed=2)
    result = ContinuousEngine(model, slots=4, max_len=80).run(prompts, limits, 0, temperature=0.7, seed=3)
    for prompt, tokens, logprobs in zip(prompts, result.tokens, result.logprobs):
        if not tokens:
            continue
        sequence = torch.tensor([prompt + tokens])
        with torch.no_grad():
            logp = F.log_softmax(model(sequence)[0, len(prompt) - 1:-1] / 0.7, dim=-1)
        expected = logp.gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1)
        assert logprobs == pytest.approx(expected.tolist(), abs=1e-4)


def test_stop_limits_and_errors(model):
    engine = ContinuousEngine(model, slots=2, max_len=40)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    result = engine.run(prompts, [4, 0, 4], stop_ids=0, temperature=0.0, stop=lambda r: sum(map(len, r.tokens)) >= 3)
    assert result.tokens[1] == [] and 3 <= sum(map(len, result.tokens)) <= 4
    full = engine.run(prompts, [4, 0, 4], stop_ids=0, temperature=0.0)  # the engine is reused after a stopped run
    assert full.tokens == generate(model, prompts, [4, 0, 4], eos_id=0, temperature=0.0).tokens
    with pytest.raises(ValueError, match="exceeds the slots' max_len 40"):
        engine.run([[5] * 30], 20, stop_ids=0)
    with pytest.raises(ValueError, match="slots"):
        ContinuousEngine(model, slots=0, max_len=40)
