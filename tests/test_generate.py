"""The sampling engine: KV cache == full forward, greedy == argmax, top-p, seeds, EOS, log-probs, left padding."""

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config

from linglab.errors import LinglabError
from linglab.generate import generate, generate_text, sample_next
from linglab.model import build_model
from linglab.tokenizer import Tokenizer

EOS = 0


@pytest.fixture(scope="module")
def model():
    # A larger init than pretraining's 0.006 spreads the logits, so greedy never hinges on a near-tie.
    return build_model(tiny_config(num_hidden_layers=2, initializer_range=0.05).model, seed=0).eval()


def prompts_of(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 512, (n,), generator=g).tolist() for n in lengths]


def test_greedy_with_cache_equals_without(model):
    prompts = prompts_of([5, 5, 3])
    cached = generate(model, prompts, 8, EOS, temperature=0.0)
    full = generate(model, prompts, 8, EOS, temperature=0.0, use_cache=False)
    assert cached.tokens == full.tokens
    for a, b in zip(cached.logprobs, full.logprobs, strict=True):
        assert a == pytest.approx(b, abs=1e-4)


def test_greedy_is_the_argmax_of_the_full_forward(model):
    prompt = prompts_of([6])[0]
    out = generate(model, [prompt], 10, eos_id=-1, temperature=0.0)  # -1: never stops early
    assert len(out.tokens[0]) == 10 and out.finished == [False]
    seq = list(prompt)
    for token in out.tokens[0]:
        assert token == model(torch.tensor([seq]))[0, -1].argmax().item()
        seq.append(token)


def test_logprobs_are_log_softmax_at_temperature_1(model):
    prompt = prompts_of([4])[0]
    out = generate(model, [prompt], 8, eos_id=-1, temperature=1.0, seed=3)
    seq = torch.tensor([prompt + out.tokens[0]])
    logp = F.log_softmax(model(seq)[0].float(), dim=-1)
    positions = torch.arange(len(prompt) - 1, seq.shape[1] - 1)
    expected = logp[positions, seq[0, positions + 1]]
    torch.testing.assert_close(torch.tensor(out.logprobs[0]), expected, rtol=1e-4, atol=1e-5)


def test_the_ending_eos_is_no_token_but_keeps_its_logprob(model):
    prompt = prompts_of([4])[0]
    free = generate(model, [prompt], 8, eos_id=-1, temperature=1.0, seed=3)
    assert free.eos_logprobs == [None]
    eos = free.tokens[0][3]  # make the 4th sampled token the EOS: the same draws then stop there
    out = generate(model, [prompt], 8, eos_id=eos, temperature=1.0, seed=3)
    assert eos not in free.tokens[0][:3], "pick a prompt/seed whose 4th token is new"
    assert out.finished == [True] and out.tokens[0] == free.tokens[0][:3]
    assert out.eos_logprobs[0] == free.logprobs[0][3]


def test_same_seed_same_samples(model):
    prompts = prompts_of([4, 4, 7])
    a = generate(model, prompts, 6, EOS, temperature=1.0, seed=7)
    b = generate(model, prompts, 6, EOS, temperature=1.0, seed=torch.Generator().manual_seed(7))
    c = generate(model, prompts, 6, EOS, temperature=1.0, seed=8)
    assert a.tokens == b.tokens and a.logprobs == b.logprobs
    assert a.tokens != c.tokens


def test_tiny_top_p_is_greedy(model):
    prompts = prompts_of([5, 3])
    greedy = generate(model, prompts, 8, EOS, temperature=0.0)
    nucleus = generate(model, prompts, 8, EOS, temperature=1.0, top_p=1e-6, seed=1)
    assert nucleus.tokens == greedy.tokens


def test_variable_length_prompts_match_generating_each_alone(model):
    prompts = prompts_of([3, 6, 3, 1, 6])
    together = generate(model, prompts, 8, EOS, temperature=0.0)
    for i, p in enumerate(prompts):
        alone = generate(model, [p], 8, EOS, temperature=0.0)
        assert together.tokens[i] == alone.tokens[0]
        assert together.logprobs[i] == pytest.approx(alone.logprobs[0], abs=1e-4)


def test_left_padded_rows_compute_what_each_row_computes_alone(model):
    prompts = prompts_of([2, 7, 4, 1])
    batch = torch.tensor([[EOS] * (7 - len(p)) + p for p in prompts])
    pad = torch.tensor([7 - len(p) for p in prompts])
    padded = model(batch, pad=pad)
    assert torch.isfinite(padded).all()  # pad queries see themselves: no empty softmax row, no NaN
    for b, p in enumerate(prompts):
        torch.testing.assert_close(padded[b, pad[b]:], model(torch.tensor([p]))[0], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="pad is for inference"):
        model(batch, targets=batch, pad=pad)


def test_per_row_limits_and_the_stop_callback(model):
    prompts = prompts_of([3, 5, 4])
    full = generate(model, prompts, 5, eos_id=-1, temperature=0.0)
    assert (full.prefill_tokens, full.decode_steps) == (3 * 5, 4)  # padded to width 5; 5 samples, 4 more forwards
    limited = generate(model, prompts, [2, 5, 0], eos_id=-1, temperature=0.0)
    assert limited.tokens == [full.tokens[0][:2], full.tokens[1], []]
    seen = []
    stopped = generate(model, prompts, 5, -1, temperature=0.0, stop=lambda r: seen.append(len(r.tokens[0])) or len(seen) == 3)
    assert seen == [1, 2, 3] and stopped.tokens == [t[:3] for t in full.tokens]


def test_stops_at_eos_per_row_and_streams(model, monkeypatch):
    real_forward = model.forward
    prompts, stop_after = [[5, 6, 7], [8, 9, 10]], [1, 4]  # row b: EOS wins once it has stop_after[b] tokens

    def forward(input_ids, cache, pad=None):
        generated = cache.pos + input_ids.shape[1] - len(prompts[0])  # tokens fed after the prompt
        logits = real_forward(input_ids, cache=cache, pad=pad)
        for b, n in enumerate(stop_after):
            if generated >= n:
                logits[b, -1, EOS] = 1e4
        return logits

    monkeypatch.setattr(model, "forward", forward)
    streamed = {0: [], 1: []}
    out = generate(model, prompts, 10, EOS, temperature=0.0, on_token=lambda r, t: streamed[r].append(t))
    assert [len(t) for t in out.tokens] == [1, 4] and out.finished == [True, True]
    assert EOS not in out.tokens[0] + out.tokens[1]
    assert streamed == {0: out.tokens[0], 1: out.tokens[1]}
    assert [len(lp) for lp in out.logprobs] == [1, 4]

    short = generate(model, prompts, 2, EOS, temperature=0.0)
    assert [len(t) for t in short.tokens] == [1, 2] and short.finished == [True, False]


def test_restores_training_mode(model):
    for m in model.moe_layers():
        m.tokens_per_expert.zero_()
    model.train()
    generate(model, prompts_of([3]), 2, EOS, temperature=0.0)
    assert model.training
    assert all(m.tokens_per_expert.sum() == 0 for m in model.moe_layers())  # ran in eval mode
    model.eval()
    generate(model, prompts_of([3]), 2, EOS, temperature=0.0)
    assert not model.training


def test_sample_next_keeps_sampling_inside_the_nucleus():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(4000, 4)
    g = torch.Generator().manual_seed(0)
    ids, logp = sample_next(logits, temperature=1.0, top_p=0.7, generator=g)
    assert set(ids.tolist()) == {0, 1}
    assert (ids == 0).float().mean().item() == pytest.approx(0.5 / 0.8, abs=0.03)  # renormalised nucleus
    torch.testing.assert_close(logp, probs.log()[ids])  # untruncated distribution
    ids, logp = sample_next(logits[:3], temperature=0.5, top_p=1.0, generator=g)
    torch.testing.assert_close(logp, F.log_softmax(logits[:3] / 0.5, dim=-1).gather(1, ids[:, None])[:, 0])


@pytest.mark.parametrize("kw, message", [
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
])
def test_bad_sampling_arguments(model, kw, message):
    with pytest.raises(LinglabError, match=message):
        generate(model, [[1, 2]], 4, EOS, **kw)


def test_bad_prompts(model):
    with pytest.raises(LinglabError, match="prompt 1 is empty"):
        generate(model, [[1], []], 4, EOS)
    with pytest.raises(LinglabError, match="outside"):
        generate(model, [[1, 512]], 4, EOS)


def test_generate_text(model):
    tok = Tokenizer.train(["12+34=?\nanswer: 46\n"] * 4, vocab_size=300)
    texts = generate_text(model, tok, ["12+34=?\n", "7"], max_new_tokens=5, temperature=0.0)
    ids = generate(model, [tok.encode("12+34=?\n"), tok.encode("7")], 5, tok.eos_id, temperature=0.0).tokens
    assert texts == [tok.decode(i) for i in ids]
