"""The embedded default corpus: synthetic, verifiable arithmetic in difficulty tiers (three core tiers, and `long`).

Every `Problem` has a `prompt` (what the model is given, ending in a newline), a worked `solution`
(what the model must write, no EOS) and the canonical `answer`. Solutions are scratchpads whose
every step is local, so that a tiny model can learn them:

    47+58=?             prompt
    47+58               restate the operation (word problems: translate it)
    7+8+0=15            column 0: digits + carry-in = carry-out, digit
    4+5+1=10            column 1, carry-in read from the line above
    answer: 105         the digits again, most significant first

Columns are processed least-significant first. Subtraction writes the borrow-out in front of the top
digit (`12-7-0=5` borrows, `05-2-1=2` does not) and restates a negative difference as `-(781-352)`;
multiplication by one digit writes `7*8+5=61`. The last line is always `answer: <integer>`, which is
what `extract_answer` and `is_correct` read, so a verifier can check sampled completions.

The `long` tier (issue 15: the long-tail regime C3PO++ exists for, SPEC §5) sums 2 to 12 two-digit numbers
(`12+34+56=?`) by adding one term at a time to the running total, each addition worked as above: `12+34`, its
columns, then `46+56`, its columns, ... Its term count is heavy-tailed (P(k) proportional to k^-2.5: about half the
problems have 2 terms, about 1 in 160 has 12), so its worked solutions run from ~30 to ~380 tokens of the
default tokenizer (median 30, 90th percentile ~160) with a long right tail. The default corpus, the tokenizer's
training text and the default evaluations use the CORE_TIERS only; `long` is opt-in (`data.tiers`, `rl.tiers`, `--tiers 3`).

    problems = generate_problems(1000, tiers=(0, 1, 2), seed=0, split="train")
    prompt, solution = format_document(problems[0])
    is_correct(model_completion, problems[0])

About 10% of problems are held out: membership is a hash of the problem's expression (`34+58`),
so a word problem and the bare sum with the same operands are always on the same side.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One arithmetic problem: the prompt, its worked solution and the canonical answer."""

    tier: int
    family: str
    prompt: str
    solution: str
    answer: str


@dataclass(frozen=True)
class Tier:
    """A difficulty level: a name, a one-line description and the problem families it draws from."""

    name: str
    description: str
    families: tuple[str, ...]


TIERS: tuple[Tier, ...] = (
    Tier("easy", "2-digit addition", ("add",)),
    Tier("medium", "3-digit addition and subtraction (differences may be negative)", ("add", "sub")),
    Tier("hard", "4-digit add/sub, 2-digit x 1-digit multiplication, one-step word problems",
         ("add", "sub", "mul", "word")),
    Tier("long", "sums of 2-12 two-digit numbers, term count heavy-tailed (solutions of ~30 to ~380 tokens)",
         ("chain",)),
)
CORE_TIERS = (0, 1, 2)  # the default corpus and evaluations; `long` is opt-in
LONG_TERMS = range(2, 13)  # the long tier's term counts
LONG_TAIL_EXPONENT = 2.5  # P(k terms) proportional to k^-2.5

HELDOUT_PERCENT = 10
SPLITS = ("train", "heldout")

_NAMES = ("Ann", "Ben", "Cara", "Dan", "Eve", "Finn", "Gus", "Hana", "Ivy", "Jo", "Kim", "Leo")
_ITEMS = ("apples", "pears", "coins", "cards", "stamps", "books", "shells", "marbles")
_GAINS = ("buys {} more", "finds {} more", "gets {} more")
_LOSSES = ("gives away {}", "sells {}", "loses {}")
_ANSWER_LINE = re.compile(r"^[ \t]*answer:[ \t]*(-?\d+)[ \t]*$", re.MULTILINE)


def _digits(n: int, width: int) -> list[int]:
    """The `width` digits of `n`, least significant first (zero-padded)."""
    return [(n // 10**i) % 10 for i in range(width)]


def _addition_steps(a: int, b: int) -> list[str]:
    width = max(len(str(a)), len(str(b)))
    lines, carry = [f"{a:0{width}d}+{b:0{width}d}"], 0
    for da, db in zip(_digits(a, width), _digits(b, width), strict=True):
        total = da + db + carry
        # Always two digits (carry, digit) so the next carry sits at the same offset on every line.
        lines.append(f"{da}+{db}+{carry}={total:02d}")
        carry = total // 10
    return lines


def _subtraction_steps(a: int, b: int) -> list[str]:
    big, small = max(a, b), min(a, b)
    width = len(str(big))
    ordered = f"{big}-{small:0{width}d}"
    lines, borrow = [ordered if a >= b else f"-({ordered})"], 0
    for dt, ds in zip(_digits(big, width), _digits(small, width), strict=True):
        borrow_out = int(dt - ds - borrow < 0)
        # The borrow-out is written as the tens digit of the top number, so the line is a true sum
        # and the next borrow-in is the first character of the line above.
        lines.append(f"{borrow_out}{dt}-{ds}-{borrow}={10 * borrow_out + dt - ds - borrow}")
        borrow = borrow_out
    return lines


def _multiplication_steps(a: int, m: int) -> list[str]:
    lines, carry = [f"{a}*{m}"], 0
    for da in _digits(a, len(str(a))):
        total = da * m + carry
        lines.append(f"{da}*{m}+{carry}={total:02d}")
        carry = total // 10
    return lines


def _make(tier: int, family: str, prompt: str, steps: list[str], answer: int) -> Problem:
    solution = "\n".join([*steps, f"answer: {answer}"])
    return Problem(tier=tier, family=family, prompt=prompt, solution=solution, answer=str(answer))


def _operand(rng: random.Random, width: int) -> int:
    """A number with exactly `width` digits."""
    return rng.randint(10 ** (width - 1), 10**width - 1)


def _word_problem(rng: random.Random, tier: int) -> Problem:
    width = rng.choice((2, 3))
    a, b = _operand(rng, width), _operand(rng, width)
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    if rng.random() < 0.5:
        prompt = f"{name} has {a} {item} and {rng.choice(_GAINS).format(b)}. How many {item} now?\n"
        return _make(tier, "word", prompt, _addition_steps(a, b), a + b)
    a, b = max(a, b), min(a, b)  # nobody gives away more than they have
    prompt = f"{name} has {a} {item} and {rng.choice(_LOSSES).format(b)}. How many {item} now?\n"
    return _make(tier, "word", prompt, _subtraction_steps(a, b), a - b)


def _chain_sum(rng: random.Random, tier: int) -> Problem:
    """The long tier: k two-digit terms summed left to right, k heavy-tailed over LONG_TERMS."""
    k = rng.choices(LONG_TERMS, weights=[n**-LONG_TAIL_EXPONENT for n in LONG_TERMS])[0]
    terms = [_operand(rng, 2) for _ in range(k)]
    steps, total = [], terms[0]
    for term in terms[1:]:
        steps += _addition_steps(total, term)
        total += term
    return _make(tier, "chain", "+".join(map(str, terms)) + "=?\n", steps, total)


def generate_problem(rng: random.Random, tier: int) -> Problem:
    """Draw one problem of `tier` (an index into `TIERS`), using only `rng` for randomness."""
    if not 0 <= tier < len(TIERS):
        raise ValueError(f"tier must be in [0, {len(TIERS)}), got {tier}")
    family = rng.choice(TIERS[tier].families)
    if family == "chain":
        return _chain_sum(rng, tier)
    width = (2, 3, 4)[tier]
    if family == "add":
        a, b = _operand(rng, width), _operand(rng, width)
        return _make(tier, family, f"{a}+{b}=?\n", _addition_steps(a, b), a + b)
    if family == "sub":
        a, b = _operand(rng, width), _operand(rng, width)
        return _make(tier, family, f"{a}-{b}=?\n", _subtraction_steps(a, b), a - b)
    if family == "mul":
        a, m = _operand(rng, 2), rng.randint(2, 9)
        return _make(tier, family, f"{a}*{m}=?\n", _multiplication_steps(a, m), a * m)
    return _word_problem(rng, tier)


def expression(problem: Problem) -> str:
    """The problem's operation as the prompt states it (`34+58`), the key of the held-out split."""
    if problem.family == "word":
        # The first solution line is the translation (never reordered: word differences are >= 0).
        return problem.solution.split("\n", 1)[0]
    return problem.prompt.removesuffix("=?\n")


def is_heldout(problem: Problem) -> bool:
    """Whether the problem belongs to the held-out split (a stable hash, same in every process)."""
    digest = hashlib.blake2b(expression(problem).encode(), digest_size=8, person=b"linglab-split").digest()
    return int.from_bytes(digest, "big") % 100 < HELDOUT_PERCENT


def generate_problems(n: int, tiers: Sequence[int], seed: int, split: str) -> list[Problem]:
    """`n` problems of `split` ("train" or "heldout"), tiers assigned round-robin from `tiers`.

    Repeating a tier in `tiers` weights it, e.g. `(0, 1, 2, 2)`. Problems are drawn with replacement,
    so small tiers can repeat; the result depends only on the arguments.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not tiers:
        raise ValueError("tiers must not be empty")
    rng, want_heldout = random.Random(seed), split == "heldout"
    problems: list[Problem] = []
    while len(problems) < n:
        problem = generate_problem(rng, tiers[len(problems) % len(tiers)])
        if is_heldout(problem) == want_heldout:
            problems.append(problem)
    return problems


def heldout_problems(n: int, tiers: Sequence[int], seed: int) -> dict[int, list[Problem]]:
    """The evaluation sets of a corpus generated with `seed`: `n` held-out problems per tier (each distinct tier once),
    tier t drawn with seed + 1 + t, so pretraining, `linglab eval`, SFT and RL evaluate on the same problems."""
    return {t: generate_problems(n, tiers=[t], seed=seed + 1 + t, split="heldout") for t in sorted(set(tiers))}


def format_document(problem: Problem) -> tuple[str, str]:
    """The (prompt, solution) pair a training document is made of; EOS is added by the data layer."""
    return problem.prompt, problem.solution


def iter_corpus_texts(n: int, seed: int) -> Iterator[str]:
    """`n` whole training documents (prompt + solution) from the core tiers, for training the tokenizer."""
    for problem in generate_problems(n, CORE_TIERS, seed, "train"):
        yield problem.prompt + problem.solution


def extract_answer(text: str) -> str | None:
    """The integer on the first `answer: <int>` line of a completion, normalised; None if there is none."""
    match = _ANSWER_LINE.search(text)
    return None if match is None else str(int(match.group(1)))


def is_correct(completion: str, problem: Problem) -> bool:
    """Whether the completion's answer line states the problem's answer (exact integer match)."""
    return extract_answer(completion) == problem.answer
