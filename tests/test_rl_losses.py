"""RL losses (SPEC §5) against hand-computed examples, and the reductions LPO must satisfy."""

import math

import pytest
import torch

from linglab.rl.losses import (
    clip_fraction,
    dapo_keep_groups,
    dapo_loss,
    drgrpo_loss,
    group_advantages,
    grpo_loss,
    gspo_loss,
    icepop_mask,
    k3_kl,
    lpo_loss,
    mismatch_stats,
    overlong_penalty,
    segment_sentences,
    sentence_ids,
    sentence_ratio,
    sequence_ratio,
    tis_weights,
    token_offsets,
)

F64 = torch.float64


def hand_batch():
    """Two responses with token ratios w = [1.0, 1.5, 0.5] (A = +1) and [1.1, 0.7, pad] (A = -1)."""
    logp = torch.tensor([[math.log(1.0), math.log(1.5), math.log(0.5)],
                         [math.log(1.1), math.log(0.7), -math.inf]], dtype=F64, requires_grad=True)
    old = torch.zeros(2, 3, dtype=F64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    return logp, old, torch.tensor([1.0, -1.0], dtype=F64), mask


def value_and_grad(loss_fn, logp, *args, **kwargs):
    loss = loss_fn(logp, *args, **kwargs)
    (grad,) = torch.autograd.grad(loss, logp)
    return loss.item(), grad


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    # Group 1: mean 0.5, population std 0.5; group 2: all equal, so zero advantage.
    adv = group_advantages(rewards, group_size=4)
    torch.testing.assert_close(adv, torch.tensor([1.0, -1.0, -1.0, 1.0, 0, 0, 0, 0]), atol=1e-5, rtol=0)
    centred = group_advantages(rewards, group_size=4, scale="none")
    torch.testing.assert_close(centred, torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))
    with pytest.raises(ValueError):
        group_advantages(rewards, group_size=3)


def test_grpo_loss_by_hand():
    logp, old, adv, mask = hand_batch()
    # Response 1: psi = 1.0, min(1.5, 1.2) = 1.2, min(0.5, 0.8) = 0.5 -> mean 0.9.
    # Response 2: psi = -1.1, -max(0.7, 0.8) = -0.8 -> mean -0.95. J = (0.9 - 0.95) / 2.
    loss, grad = value_and_grad(grpo_loss, logp, old, adv, mask)
    assert loss == pytest.approx(0.025)
    # d psi / d log w = w A on unclipped tokens, scaled by 1 / (|y_i| B); clipped tokens and padding get 0.
    expected = torch.tensor([[-1 / 6, 0.0, -1 / 12], [0.275, 0.0, 0.0]], dtype=F64)
    torch.testing.assert_close(grad, expected)


def test_dapo_loss_by_hand():
    logp, old, adv, mask = hand_batch()
    # Clip-higher: 1.5 -> 1.28 for A > 0; 0.7 -> 0.8 for A < 0. Sum 1 + 1.28 + 0.5 - 1.1 - 0.8 = 0.88 over 5 tokens.
    loss, grad = value_and_grad(dapo_loss, logp, old, adv, mask)
    assert loss == pytest.approx(-0.176)
    torch.testing.assert_close(grad, torch.tensor([[-0.2, 0.0, -0.1], [0.22, 0.0, 0.0]], dtype=F64))


def test_drgrpo_loss_by_hand():
    logp, old, adv, mask = hand_batch()
    # Sum 1 + 1.2 + 0.5 - 1.1 - 0.8 = 0.8, divided by B * max_len.
    assert drgrpo_loss(logp, old, adv, mask).item() == pytest.approx(-0.8 / 6)
    assert drgrpo_loss(logp, old, adv, mask, max_len=4).item() == pytest.approx(-0.1)


def test_gspo_loss_by_hand_and_gradient_flows_through_sequence_ratio():
    logp = torch.tensor([[1e-4, 3e-4, 0.0], [1e-3, 3e-3, 2e-3], [1e-3, 3e-3, 2e-3]], dtype=F64, requires_grad=True)
    old = torch.zeros(3, 3, dtype=F64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 1]], dtype=torch.bool)
    adv = torch.tensor([1.0, -1.0, 1.0], dtype=F64)
    s1, s2 = math.exp(2e-4), math.exp(2e-3)
    # s1 is inside [1 - 3e-4, 1 + 4e-4]; s2 is above, clipped for A > 0 but not for A < 0 (min picks -s2).
    loss, grad = value_and_grad(gspo_loss, logp, old, adv, mask)
    assert loss == pytest.approx(-(s1 - s2 + 1.0004) / 3, rel=1e-12)
    # d s_i / d logp_t = s_i / |y_i|: every token of an unclipped response gets gradient.
    expected = torch.tensor([[-s1 / 2 / 3, -s1 / 2 / 3, 0.0], [s2 / 3 / 3] * 3, [0.0] * 3], dtype=F64)
    torch.testing.assert_close(grad, expected)
    torch.testing.assert_close(sequence_ratio(logp, old, mask), torch.tensor([s1, s2, s2], dtype=F64))


def test_lpo_loss_by_hand():
    # Column 0 is a prompt token; response 1 has sentences {1, 2} and {3}; response 2 one sentence {1, 2}.
    logp = torch.tensor([[-5.0, 0.01, 0.03, 0.1], [-5.0, -0.1, 0.0, -math.inf]], dtype=F64, requires_grad=True)
    old = torch.tensor([[-1.0, 0.0, 0.0, 0.0], [-1.0, 0.0, 0.0, 0.0]], dtype=F64)
    mask = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 0]], dtype=torch.bool)
    sentence_ids = torch.tensor([[-1, 0, 0, 1], [-1, 0, 0, -1]])
    adv = torch.tensor([1.0, -1.0], dtype=F64)
    r = math.exp(0.02)
    # r = e^0.02 inside 1 +- 0.03 (2 tokens); e^0.1 clipped to 1.03 (1 token); e^-0.05 = 0.951 below 0.97 with
    # A < 0, so psi = -0.97 (2 tokens). 5 response tokens.
    loss, grad = value_and_grad(lpo_loss, logp, old, adv, mask, sentence_ids)
    assert loss == pytest.approx(-(2 * r + 1.03 - 2 * 0.97) / 5)
    # Only sentence {1, 2} of response 1 is unclipped: d(2 r)/d logp_t = r for each of its two tokens.
    torch.testing.assert_close(grad, torch.tensor([[0.0, -r / 5, -r / 5, 0.0], [0.0] * 4], dtype=F64))
    ratios = sentence_ratio(logp, old, mask, sentence_ids)
    torch.testing.assert_close(ratios, torch.tensor([[1.0, r, r, math.exp(0.1)], [1.0, math.exp(-0.05), math.exp(-0.05), 1.0]],
                                                    dtype=F64))


def random_batch(seed=0, groups=2, group_size=3, t=9):
    g = torch.Generator().manual_seed(seed)
    batch = groups * group_size
    prompt = torch.randint(1, 3, (batch,), generator=g)
    length = torch.randint(1, t - 2, (batch,), generator=g)
    pos = torch.arange(t)
    mask = (pos >= prompt[:, None]) & (pos < (prompt + length)[:, None])
    old = -torch.rand(batch, t, generator=g, dtype=F64) * 3
    logp = (old + 0.05 * torch.randn(batch, t, generator=g, dtype=F64)).requires_grad_()
    adv = group_advantages(torch.randint(0, 2, (batch,), generator=g).to(F64), group_size)
    weights = torch.rand(batch, t, generator=g, dtype=F64) * 2
    return logp, old, adv, mask, weights


@pytest.mark.parametrize("with_weights", [False, True])
def test_lpo_with_one_token_sentences_is_token_mean_grpo(with_weights):
    logp, old, adv, mask, weights = random_batch()
    weights = weights if with_weights else None
    # Every token its own sentence: ids 0, 1, 2, ... along each response.
    sentence_ids = torch.where(mask, mask.long().cumsum(-1) - 1, -1)
    lpo, lpo_grad = value_and_grad(lpo_loss, logp, old, adv, mask, sentence_ids, eps=0.03, token_weights=weights)
    dapo, dapo_grad = value_and_grad(dapo_loss, logp, old, adv, mask, eps_low=0.03, eps_high=0.03, token_weights=weights)
    assert lpo == pytest.approx(dapo, rel=1e-12)
    torch.testing.assert_close(lpo_grad, dapo_grad)
    assert lpo_grad.abs().sum() > 0


@pytest.mark.parametrize("with_weights", [False, True])
def test_lpo_with_one_sentence_per_response_is_token_mean_gspo(with_weights):
    logp, old, adv, mask, weights = random_batch(seed=1)
    weights = weights if with_weights else None
    sentence_ids = torch.where(mask, 0, -1)
    lpo, lpo_grad = value_and_grad(lpo_loss, logp, old, adv, mask, sentence_ids, eps=0.03, token_weights=weights)
    gspo, gspo_grad = value_and_grad(gspo_loss, logp, old, adv, mask, eps_low=0.03, eps_high=0.03, token_mean=True,
                                     token_weights=weights)
    assert lpo == pytest.approx(gspo, rel=1e-12)
    torch.testing.assert_close(lpo_grad, gspo_grad)
    assert lpo_grad.abs().sum() > 0


def test_gspo_sequence_mean_equals_token_mean_for_equal_lengths_and_unit_weights_change_nothing():
    logp, old, adv, _, _ = random_batch(seed=2)
    mask = torch.zeros_like(logp, dtype=torch.bool)
    mask[:, 2:6] = True
    plain = gspo_loss(logp, old, adv, mask, eps_low=0.03, eps_high=0.03)
    assert plain.item() == pytest.approx(gspo_loss(logp, old, adv, mask, eps_low=0.03, eps_high=0.03, token_mean=True).item())
    ones = torch.ones_like(old)
    assert plain.item() == pytest.approx(gspo_loss(logp, old, adv, mask, eps_low=0.03, eps_high=0.03, token_weights=ones).item())


def test_icepop_masks_exactly_outside_the_band_and_tis_never_masks():
    k = [0.49, 0.5, 1.0, 5.0, 5.01]
    train_old = torch.tensor([[math.log(v) for v in k]])
    infer = torch.zeros(1, 5)
    torch.testing.assert_close(icepop_mask(train_old, infer, alpha=0.5, beta=5.0), torch.tensor([[0.0, 0.5, 1.0, 5.0, 0.0]]))
    tis = tis_weights(train_old, infer, cap=2.0)
    torch.testing.assert_close(tis, torch.tensor([[0.49, 0.5, 1.0, 2.0, 2.0]]))
    assert (tis > 0).all()
    # Only the ratio matters, not the log-probs' level.
    torch.testing.assert_close(icepop_mask(train_old - 3.0, infer - 3.0), torch.tensor([[0.0, 0.5, 1.0, 5.0, 0.0]]))


@pytest.mark.parametrize("loss_fn", [grpo_loss, dapo_loss, drgrpo_loss, gspo_loss, lpo_loss])
def test_icepop_masked_tokens_contribute_nothing_under_any_loss(loss_fn):
    logp, old, adv, mask, _ = random_batch(seed=3)
    infer = old.clone()
    infer[mask] -= 0.1  # k = e^0.1, kept
    masked_response = 2  # every token of one response far off: k = e^3 > beta
    infer[masked_response][mask[masked_response]] -= 3.0
    weights = icepop_mask(old, infer)
    extra = (torch.where(mask, 0, -1),) if loss_fn is lpo_loss else ()
    loss = loss_fn(logp, old, adv, mask, *extra, token_weights=weights)
    (grad,) = torch.autograd.grad(loss, logp)
    assert grad[masked_response].abs().sum() == 0
    assert grad.abs().sum() > 0


@pytest.mark.parametrize("loss_fn", [grpo_loss, dapo_loss, drgrpo_loss, gspo_loss, lpo_loss])
def test_padding_with_infinite_log_probs_stays_finite_under_tis(loss_fn):
    logp, old, adv, mask, _ = random_batch(seed=4)
    logp = torch.where(mask, logp, -math.inf).detach().requires_grad_()
    old = torch.where(mask, old, -math.inf)
    infer = torch.where(mask, old - 0.2, -math.inf)  # TIS of -inf over -inf is NaN off the response
    extra = (torch.where(mask, mask.long().cumsum(-1) - 1, -1),) if loss_fn is lpo_loss else ()
    loss = loss_fn(logp, old, adv, mask, *extra, token_weights=tis_weights(old, infer))
    (grad,) = torch.autograd.grad(loss, logp)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


def test_mismatch_stats_and_clip_fraction():
    train = torch.zeros(1, 4)
    infer = torch.tensor([[0.0, -1.0, 2.5, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    stats = mismatch_stats(train, infer, mask)
    # |log diff| = 0, 1, 2.5 (padding ignored); k = 1, e, e^-2.5 = 0.08 -> one of three masked.
    assert stats == pytest.approx({"mean_abs_logdiff": 3.5 / 3, "max_abs_logdiff": 2.5, "icepop_mask_fraction": 1 / 3})
    logp, old, adv, mask = hand_batch()
    ratio = torch.exp(torch.where(mask, logp - old, 0.0)).detach()
    # 1.5 > 1.2 with A > 0 and 0.7 < 0.8 with A < 0 are clipped; 0.5 with A > 0 is not.
    assert clip_fraction(ratio, adv, mask, 0.2, 0.2) == pytest.approx(2 / 5)


def test_k3_kl_by_hand():
    logp = torch.tensor([[math.log(0.5), math.log(0.3), 0.0]], requires_grad=True)
    ref = torch.tensor([[math.log(0.25), math.log(0.3), 5.0]])
    mask = torch.tensor([[1, 1, 0]])
    # Token 1: d = log 0.5, e^d - d - 1 = 0.5 + log 2 - 1; token 2: d = 0 -> 0. Mean over 2 tokens.
    kl = k3_kl(logp, ref, mask)
    assert kl.item() == pytest.approx((math.log(2) - 0.5) / 2, rel=1e-6)
    kl.backward()
    # d/dlogp (e^(ref - logp) + logp) = 1 - e^(ref - logp) = 0.5 for token 1, over 2 tokens.
    torch.testing.assert_close(logp.grad, torch.tensor([[0.25, 0.0, 0.0]]))


def test_dapo_keep_groups_and_overlong_penalty():
    keep = dapo_keep_groups(torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0]), group_size=2)
    assert keep.tolist() == [True, True, False, False, False, False]
    penalty = overlong_penalty(torch.tensor([0, 80, 90, 100, 120]), max_len=100, cache_len=20)
    torch.testing.assert_close(penalty, torch.tensor([0.0, 0.0, -0.5, -1.0, -1.0]))


def texts(text, spans):
    assert spans[0][0] == 0 and spans[-1][1] == len(text)
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    return [text[a:b] for a, b in spans]


@pytest.mark.parametrize("text, sentences", [
    ("a. b, c", ["a.", " b,", " c"]),
    ("Pi is 3.14 and I own 1,000 apples.", ["Pi is 3.14 and I own 1,000 apples."]),
    ("Wait... really?! yes", ["Wait...", " really?!", " yes"]),
    ("47+58\n7+8+0=15\nanswer: 105", ["47+58\n", "7+8+0=15\n", "answer:", " 105"]),
    ("你好。我很好，谢谢！再见、朋友", ["你好。", "我很好，", "谢谢！", "再见、", "朋友"]),
    ("It costs 3. Then 4,5", ["It costs 3.", " Then 4,5"]),
    ("a.\n\nb", ["a.\n\n", "b"]),
])
def test_segment_sentences(text, sentences):
    assert texts(text, segment_sentences(text)) == sentences


def test_segment_sentences_covers_any_text():
    assert segment_sentences("") == []
    text = "x=1.5; y: 2,\n\n z?? 12,345.6 end。"
    spans = segment_sentences(text)
    assert "".join(texts(text, spans)) == text


def piece_decoder(pieces, strip_leading_space=False, cleanup=False):
    """decode() of a tokenizer whose token i is pieces[i]; optionally one that drops a leading space (as
    SentencePiece does) or rewrites " ." into "." (a cleanup that acts across tokens)."""
    def decode(ids):
        text = "".join(pieces[i] for i in ids)
        text = text.removeprefix(" ") if strip_leading_space else text
        return text.replace(" .", ".") if cleanup else text
    return decode


def ids_of(pieces, **kw):
    return sentence_ids(*token_offsets(piece_decoder(pieces, **kw), range(len(pieces))))


def test_sentence_ids_by_hand():
    # "a. b, c" + EOS (decodes to ""): the EOS joins the last sentence.
    assert ids_of(["a", ".", " b", ",", " c", ""]) == [0, 0, 1, 1, 2, 2]
    # ". T" starts on the '.', so it belongs to "Hi."; "here" to " There".
    assert ids_of(["Hi", ". T", "here"]) == [0, 0, 1]
    # "a.b." swallows two sentences whole: ids stay contiguous.
    assert ids_of(["a.b.", "c"]) == [0, 1]
    assert ids_of([]) == []


def test_token_offsets_for_tokenizers_that_rewrite_text():
    pieces = [" Hi", ".", " There", " you"]  # a leading space a SentencePiece-like decode drops at the start only
    assert token_offsets(piece_decoder(pieces, strip_leading_space=True), range(4)) == ("Hi. There you", [0, 2, 3, 9])
    # A cleanup across a window boundary: the pieces no longer add up to decode(ids), so every prefix is decoded.
    assert token_offsets(piece_decoder(["a", " ", "."], cleanup=True), range(3)) == ("a.", [0, 1, 2])


def test_sentence_ids_with_the_linglab_tokenizer_on_split_characters():
    from linglab.tasks import iter_corpus_texts
    from linglab.tokenizer import Tokenizer

    tok = Tokenizer.train(iter_corpus_texts(300, seed=0), vocab_size=300)  # ASCII only: CJK characters stay bytes
    text = "先算十。再算二，答案3.14"
    encoding = tok.hf_tokenizer.encode(text, add_special_tokens=False)
    ids = encoding.ids + [tok.eos_id]
    assert len(ids) > len(text) + 1, "each CJK character must be split into byte tokens"
    # Decoded one by one, the bytes become U+FFFD and the pause marks vanish: one sentence.
    assert len(segment_sentences("".join(tok.decode([t]) for t in ids))) == 1
    calls = []
    decoded, offsets = token_offsets(lambda window: calls.append(len(window)) or tok.decode(window), ids)
    assert decoded == text and len(calls) <= 2 * len(ids) + 1 and max(calls[:-1]) <= 6
    spans = segment_sentences(text)
    assert texts(text, spans) == ["先算十。", "再算二，", "答案3.14"]
    # Each token's sentence holds the character its bytes begin (the tokenizer's own offsets); EOS is last.
    expected = [next(k for k, (a, b) in enumerate(spans) if a <= start < b) for start, _ in encoding.offsets] + [2]
    assert offsets[-1] == len(text) and sentence_ids(decoded, offsets) == expected
