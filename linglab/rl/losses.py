"""Policy losses of SPEC §5 (GRPO, DAPO, Dr.GRPO, GSPO, LPO), the train-inference mismatch corrections
(IcePop, TIS) and the sentence segmentation that gives LPO its action units.

Every loss is a pure function of a padded batch of B = groups * G responses, a prompt's G responses
contiguous, and returns a scalar to minimise (-J):

    logp        [B, T]  log pi_theta of each token (carries the gradient)
    old_logp    [B, T]  log pi_old, the trainer's log-probs at the rollout's weights (detached)
    advantages  [B]     one per response, shared by its tokens (`group_advantages`)
    mask        [B, T]  1 on response tokens, 0 on prompt and padding (bool or float)

The optional `token_weights` [B, T] multiplies each token's psi term, so a mismatch correction composes
with any loss:

    adv = group_advantages(rewards, group_size=8)
    ids = sentence_ids(*token_offsets(tok.decode, response))    # one response's tokens; -1 elsewhere in sentence_ids
    loss = lpo_loss(logp, old_logp, adv, mask, sentence_ids, token_weights=icepop_mask(old_logp, rollout_logp))

For GSPO and LPO the ratio belongs to a sequence or sentence, but the objective is still a sum of one
term per token (|s_ik| * psi(r_ik) is psi(r_ik) counted once for each token of the sentence), and the
weight multiplies that token's copy: a sentence whose tokens are all masked drops out, a partly masked
one counts only its kept tokens. The masked tokens still enter the ratio's geometric mean, because
IcePop judges the rollout's probabilities, not the trainer's ratio.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

SENTENCE_DELIMITERS = frozenset(".!?;:,\n。！？；：，、")
REPLACEMENT_CHARACTER = "\ufffd"


def _lengths(mask: Tensor) -> Tensor:
    """Response lengths |y_i| [B] as floats, at least 1 so that an empty response divides safely."""
    return mask.float().sum(-1).clamp(min=1)


def _log_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor) -> Tensor:
    """log w_t [B, T], zero off the response."""
    # Padding may hold -inf log-probs: select rather than multiply so that it cannot become NaN.
    return torch.where(mask.bool(), logp - old_logp.detach(), 0.0)


def _weighted_terms(ratio: Tensor, advantages: Tensor, mask: Tensor, eps_low: float, eps_high: float,
                    token_weights: Tensor | None) -> Tensor:
    """Per-token psi(ratio, A_i) times the optional weight [B, T], zero off the response."""
    response = mask.bool()
    terms = clipped_surrogate(ratio, advantages[:, None], eps_low, eps_high)
    if token_weights is not None:
        # Weights off the response may be NaN (e.g. TIS of two -inf log-probs); zero them before they meet a gradient.
        terms = terms * torch.where(response, token_weights.detach(), 0.0)
    return torch.where(response, terms, 0.0)


def clipped_surrogate(ratio: Tensor, advantages: Tensor, eps_low: float, eps_high: float) -> Tensor:
    """psi(r, A) = min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) of SPEC §5, elementwise."""
    return torch.minimum(ratio * advantages, ratio.clamp(1 - eps_low, 1 + eps_high) * advantages)


def group_advantages(rewards: Tensor, group_size: int, scale: str = "std", eps: float = 1e-6) -> Tensor:
    """Group-relative advantages [B] (SPEC §5): (R - mean R) / (std R + eps) for GRPO, R - mean R for Dr.GRPO.

    The std is the population std of the group: the G rewards are the whole group being normalised,
    not a sample from which to estimate a wider spread, and it stays defined (0) for G = 1.
    """
    if scale not in ("std", "none"):
        raise ValueError(f"scale must be 'std' or 'none', got {scale!r}")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    groups = rewards.float().view(-1, group_size)
    centred = groups - groups.mean(-1, keepdim=True)
    if scale == "std":
        centred = centred / (groups.std(-1, correction=0, keepdim=True) + eps)
    return centred.flatten()


def grpo_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, eps: float = 0.2,
              token_weights: Tensor | None = None) -> Tensor:
    """GRPO (SPEC §5): per-token psi(w_t, A_i), mean over each response's tokens, then over responses.

    Add `beta * k3_kl(logp, ref_logp, mask)` for the optional KL to a reference.
    """
    ratio = torch.exp(_log_ratio(logp, old_logp, mask))
    terms = _weighted_terms(ratio, advantages, mask, eps, eps, token_weights)
    return -(terms.sum(-1) / _lengths(mask)).mean()


def dapo_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, eps_low: float = 0.2,
              eps_high: float = 0.28, token_weights: Tensor | None = None) -> Tensor:
    """DAPO (SPEC §5): per-token psi(w_t, A_i) with clip-higher, averaged over all tokens of the batch.

    The token mean lets every token weigh the same, so long responses are not diluted as in GRPO.
    """
    ratio = torch.exp(_log_ratio(logp, old_logp, mask))
    terms = _weighted_terms(ratio, advantages, mask, eps_low, eps_high, token_weights)
    return -terms.sum() / _lengths(mask).sum()


def dapo_keep_groups(correct: Tensor, group_size: int) -> Tensor:
    """DAPO dynamic sampling (SPEC §5): bool [B], False for every response of a group whose correctness is all equal.

    A group all right or all wrong says nothing about what is right (its correctness advantage is zero; only the
    length or format terms could still tell its responses apart); DAPO drops it and samples more prompts.
    """
    if correct.numel() % group_size:
        raise ValueError(f"{correct.numel()} responses do not split into groups of {group_size}")
    groups = correct.view(-1, group_size)
    varied = (groups != groups[:, :1]).any(-1)
    return varied.repeat_interleave(group_size)


def overlong_penalty(lengths: Tensor, max_len: int, cache_len: int) -> Tensor:
    """DAPO's soft overlong punishment [B] (SPEC §5): 0 up to max_len - cache_len, then linear down to -1 at max_len.

    Lengths beyond max_len (truncated responses) get -1.
    """
    if not 0 < cache_len <= max_len:
        raise ValueError(f"cache_len must be in (0, max_len], got {cache_len} with max_len {max_len}")
    over = lengths.float() - (max_len - cache_len)
    return -(over / cache_len).clamp(0.0, 1.0)


def drgrpo_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, eps: float = 0.2,
                max_len: int | None = None, token_weights: Tensor | None = None) -> Tensor:
    """Dr.GRPO (SPEC §5): per-token psi(w_t, A_i) summed, divided by the constant B * max_len.

    Dividing by each |y_i| (GRPO) favours long wrong answers; a constant normaliser keeps every token's
    weight independent of its response's length. `max_len` is the generation budget, the padded T by
    default. Pair with `group_advantages(..., scale="none")`: Dr.GRPO drops the std division too.
    """
    ratio = torch.exp(_log_ratio(logp, old_logp, mask))
    terms = _weighted_terms(ratio, advantages, mask, eps, eps, token_weights)
    return -terms.sum() / (mask.shape[0] * (max_len or mask.shape[1]))


def sequence_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor) -> Tensor:
    """GSPO's s_i = exp(mean over the response's tokens of log w_t) [B] (SPEC §5), differentiable in logp."""
    return torch.exp(_log_ratio(logp, old_logp, mask).sum(-1) / _lengths(mask))


def gspo_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, eps_low: float = 3e-4,
              eps_high: float = 4e-4, token_mean: bool = False, token_weights: Tensor | None = None) -> Tensor:
    """GSPO (SPEC §5): psi(s_i, A_i) with the sequence ratio s_i, mean over responses.

    `token_mean=True` weighs each response by its length instead ((1/sum|y_i|) sum_i |y_i| psi(s_i, A_i)),
    the aggregation LPO reduces to when a response is one sentence. With `token_weights`, |y_i| becomes the
    sum of the response's token weights (see the module docstring).
    """
    per_response = clipped_surrogate(sequence_ratio(logp, old_logp, mask), advantages, eps_low, eps_high)
    lengths = _lengths(mask)
    weight = lengths if token_weights is None else torch.where(mask.bool(), token_weights.detach(), 0.0).sum(-1)
    if token_mean:
        return -(per_response * weight).sum() / lengths.sum()
    return -(per_response * weight / lengths).mean()


def sentence_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor, sentence_ids: Tensor) -> Tensor:
    """LPO's r_k = exp(mean over sentence k's tokens of log w_t), broadcast to each of its tokens [B, T] (SPEC §5).

    `sentence_ids` [B, T] numbers the sentences of each response from 0 (-1 off the response). The ratio is 1 off the response.
    """
    response = mask.bool()
    if bool((response & (sentence_ids < 0)).any()):
        raise ValueError("every response token (mask 1) needs a sentence id >= 0")
    batch, _ = logp.shape
    n_sentences = int(sentence_ids.max()) + 1 if sentence_ids.numel() else 1
    # One flat slot per (response, sentence): a scatter-add gives every sentence's sum and size at once.
    slots = (torch.arange(batch, device=logp.device)[:, None] * n_sentences + sentence_ids.clamp(min=0)).flatten()
    log_w = _log_ratio(logp, old_logp, mask)
    sums = log_w.new_zeros(batch * n_sentences).index_add(0, slots, log_w.flatten())
    sizes = log_w.new_zeros(batch * n_sentences).index_add(0, slots, response.flatten().to(log_w.dtype))
    mean_log_w = (sums / sizes.clamp(min=1))[slots].view_as(log_w)
    return torch.where(response, torch.exp(mean_log_w), 1.0)


def lpo_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, sentence_ids: Tensor,
             eps: float = 0.03, token_weights: Tensor | None = None) -> Tensor:
    """LPO (SPEC §5): J = (1 / sum_i |y_i|) sum_i sum_k |s_ik| psi(r_ik, A_i), the sentence as the action unit.

    Written as one psi(r_ik, A_i) per token of sentence k, which sums to |s_ik| psi(r_ik, A_i). It reduces to
    `dapo_loss` with eps_low = eps_high = eps when every sentence is one token and to `gspo_loss(token_mean=True)`
    when every response is one sentence.
    """
    ratio = sentence_ratio(logp, old_logp, mask, sentence_ids)
    terms = _weighted_terms(ratio, advantages, mask, eps, eps, token_weights)
    return -terms.sum() / _lengths(mask).sum()


def tis_weights(train_logp_old: Tensor, infer_logp: Tensor, cap: float = 2.0) -> Tensor:
    """TIS (SPEC §5): min(k_t, C) with k_t = pi_train(theta_old) / pi_infer(theta_old); reweights, never masks."""
    return torch.exp(train_logp_old.detach() - infer_logp.detach()).clamp(max=cap)


def icepop_mask(train_logp_old: Tensor, infer_logp: Tensor, alpha: float = 0.5, beta: float = 5.0) -> Tensor:
    """IcePop (SPEC §5): M(k_t) = k_t if alpha <= k_t <= beta else 0, k_t = pi_train(theta_old) / pi_infer(theta_old)."""
    log_k = train_logp_old.detach() - infer_logp.detach()
    # Compare in log space: exp rounding must not push a k of exactly alpha or beta outside the band.
    keep = (log_k >= math.log(alpha)) & (log_k <= math.log(beta))
    return torch.where(keep, torch.exp(log_k), 0.0)


def mismatch_stats(train_logp: Tensor, infer_logp: Tensor, mask: Tensor, alpha: float = 0.5,
                   beta: float = 5.0) -> dict[str, float]:
    """Per-step mismatch report of SPEC §5 over response tokens: mean and max |log pi_train - log pi_infer|
    and the fraction of tokens IcePop (alpha, beta) masks."""
    response = mask.bool()
    if not bool(response.any()):
        return {"mean_abs_logdiff": 0.0, "max_abs_logdiff": 0.0, "icepop_mask_fraction": 0.0}
    diff = (train_logp.detach() - infer_logp.detach()).abs()[response]
    masked = (icepop_mask(train_logp, infer_logp, alpha, beta) == 0)[response]
    return {"mean_abs_logdiff": diff.mean().item(), "max_abs_logdiff": diff.max().item(),
            "icepop_mask_fraction": masked.float().mean().item()}


def k3_kl(logp: Tensor, ref_logp: Tensor, mask: Tensor) -> Tensor:
    """k3 estimator of KL(pi_theta || pi_ref) (SPEC §5): exp(d) - d - 1 with d = log pi_ref - log pi_theta, token mean.

    Unbiased like log-ratio and never negative, unlike it.
    """
    d = torch.where(mask.bool(), ref_logp.detach() - logp, 0.0)
    return (torch.exp(d) - d - 1).sum() / _lengths(mask).sum()


def clip_fraction(ratio: Tensor, advantages: Tensor, mask: Tensor, eps_low: float, eps_high: float) -> float:
    """Fraction of response tokens whose psi term is clipped (no gradient): A > 0 and r > 1 + eps_high, or A < 0 and r < 1 - eps_low.

    `ratio` is per token [B, T], or [B, 1] for a sequence ratio (each of its tokens then counts).
    """
    adv = advantages[:, None]
    clipped = ((adv > 0) & (ratio > 1 + eps_high)) | ((adv < 0) & (ratio < 1 - eps_low))
    response = mask.bool()
    return ((clipped & response).sum() / response.sum().clamp(min=1)).item()


def _ends_sentence(text: str, i: int) -> bool:
    """Whether the character at i is pause punctuation that ends a sentence."""
    if text[i] not in SENTENCE_DELIMITERS:
        return False
    # "3.14" and "1,000": a '.' or ',' between two digits is part of a number.
    inside_number = 0 < i < len(text) - 1 and text[i - 1].isdecimal() and text[i + 1].isdecimal()
    return not (text[i] in ".," and inside_number)


def segment_sentences(text: str) -> list[tuple[int, int]]:
    """LPO sentences (SPEC §5) as (start, end) character spans that cover `text` in order.

    A sentence ends after pause punctuation (. ! ? ; : , newline and CJK 。！？；：，、), never inside a number.
    A run of delimiters ("...", "?!", ".\\n") ends one sentence and belongs to it. Whitespace after it starts the
    next sentence: byte-level BPE tokens carry their leading space (" b"), so the token starts the sentence too.
    """
    spans, start, i = [], 0, 0
    while i < len(text):
        if _ends_sentence(text, i):
            while i + 1 < len(text) and text[i + 1] in SENTENCE_DELIMITERS:
                i += 1
            spans.append((start, i + 1))
            start = i + 1
        i += 1
    if start < len(text):
        spans.append((start, len(text)))
    return spans


def _continues_a_character(text: str) -> bool:
    """Whether decoded text ends in an incomplete character: byte-level decoders render it as U+FFFD."""
    return text.endswith(REPLACEMENT_CHARACTER)


def token_offsets(decode: Callable[[Sequence[int]], str], ids: Sequence[int]) -> tuple[str, list[int]]:
    """(decode(ids), the character offset in it of each token): where each token's text begins.

    Works with any tokenizer's `decode`, as streaming detokenisers do: each step decodes a short window (the
    tokens since the last piece that was written, after the piece before it as context, so that tokenizers
    which drop a leading space at the start of a text see it) and writes the new text once it does not end in
    an incomplete character. A multi-byte character split across byte-level tokens therefore decodes whole,
    and each token of it begins at that character: a token belongs to the first character it holds bytes of,
    also where it only completes one begun by the token before it. A token that decodes to nothing (EOS) begins
    where the next character will. O(len(ids)) decode calls of a few tokens each.

    Should the written pieces not add up to `decode(ids)` (a tokenizer whose decode rewrites across tokens, such
    as a cleanup of " ." into "."), the offsets come from decoding every prefix instead: O(len(ids)^2) characters.
    """
    ids = list(ids)
    written, offsets = "", []
    context = start = 0  # the window ids[context:start] is context, ids[start:] is not written yet
    context_text = ""
    for end in range(1, len(ids) + 1):
        window = decode(ids[context:end])
        if _continues_a_character(window) and end < len(ids):
            continue
        for j in range(start, end):  # the tokens of this piece, each at the first character it adds to
            before = decode(ids[context:j]) if j > start else context_text
            within = len(before) - len(context_text) - int(j > start and _continues_a_character(before))
            offsets.append(len(written) + within)
        written += window[len(context_text):]
        context, start = start, end
        context_text = decode(ids[context:start])
    text = decode(ids)
    if written == text:
        return text, offsets
    prefixes = [decode(ids[:j]) for j in range(len(ids))]
    return text, [len(p) - int(_continues_a_character(p)) for p in prefixes]


def sentence_ids(text: str, offsets: Sequence[int]) -> list[int]:
    """The LPO sentence (`segment_sentences` of `text`) of each token of one response, numbered 0, 1, ... with no gaps.

    `offsets` are where the tokens begin in `text` (`token_offsets`); a token belongs to the sentence holding its
    first character, one at the end of the text (EOS) to the last sentence. A sentence that no token begins in
    (a token spanning two sentences) gets no id, so ids stay contiguous.
    """
    starts = [start for start, _ in segment_sentences(text)]
    ids: list[int] = []
    previous = 0
    for offset in offsets:
        sentence = max(bisect.bisect_right(starts, offset) - 1, previous)
        # Sentences never go back along the response, so counting changes numbers them without gaps.
        ids.append(ids[-1] + int(sentence != previous) if ids else 0)
        previous = sentence
    return ids
