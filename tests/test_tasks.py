"""The default corpus: worked solutions are right, splits are disjoint and stable, answers parse."""

from __future__ import annotations

import random
import re

import pytest

from linglab.tasks import (
    CORE_TIERS,
    LONG_TERMS,
    TIERS,
    Problem,
    expression,
    extract_answer,
    format_document,
    generate_problem,
    generate_problems,
    is_correct,
    is_heldout,
    iter_corpus_texts,
)

STEP = re.compile(r"^(\d)?(\d)([+\-*])(\d)([+\-])(\d)=(\d+)$")


def evaluate(text: str) -> tuple[str, int]:
    """The operator and value of `a+b`, `a-b` or `a*b`."""
    a, op, b = re.fullmatch(r"(\d+)([+\-*])(\d+)", text).groups()
    return op, {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]


def check_solution(problem: Problem) -> None:
    """Recompute every scratchpad line and the answer from the operation the prompt states."""
    first, *steps, last = problem.solution.split("\n")
    negative = first.startswith("-(")
    op, value = evaluate(first.removeprefix("-(").removesuffix(")"))
    assert str(-value if negative else value) == problem.answer
    assert evaluate(expression(problem))[1] == int(problem.answer)
    if problem.family != "word":
        assert expression(problem) == problem.prompt.removesuffix("=?\n")
    else:
        assert all(number in problem.prompt for number in re.findall(r"\d+", first))
    assert last == f"answer: {problem.answer}"

    digits, carry = [], 0
    for step in steps:
        borrow_out, top, step_op, digit, carry_op, carry_in, written = STEP.fullmatch(step).groups()
        assert step_op == op and int(carry_in) == carry
        top, digit, result = int(top), int(digit), int(written)
        if op == "-":
            assert carry_op == "-" and borrow_out is not None and len(written) == 1
            assert 10 * int(borrow_out) + top - digit - carry == result
            digits.append(result)
            carry = int(borrow_out)
        else:
            assert carry_op == "+" and borrow_out is None and len(written) == 2
            assert {"+": top + digit, "*": top * digit}[op] + carry == result
            digits.append(result % 10)
            carry = result // 10
    assert int("".join(map(str, reversed(digits)))) + carry * 10 ** len(digits) == abs(value)


@pytest.mark.parametrize("tier", CORE_TIERS)
def test_solutions_are_correct(tier: int) -> None:
    rng = random.Random(tier)
    families = set()
    for _ in range(2000):
        problem = generate_problem(rng, tier)
        assert problem.tier == tier and problem.prompt.endswith("\n")
        assert not problem.solution.endswith("\n")
        check_solution(problem)
        assert is_correct(problem.solution, problem)
        families.add(problem.family)
    assert families == set(TIERS[tier].families)


def test_long_tier_adds_term_by_term_with_a_heavy_tail() -> None:
    rng, counts = random.Random(7), {k: 0 for k in LONG_TERMS}
    for _ in range(2000):
        problem = generate_problem(rng, 3)
        terms = [int(t) for t in problem.prompt.removesuffix("=?\n").split("+")]
        counts[len(terms)] += 1
        assert problem.family == "chain" and int(problem.answer) == sum(terms) and is_correct(problem.solution, problem)
        *lines, last = problem.solution.split("\n")
        assert last == f"answer: {sum(terms)}"
        starts = [i for i, line in enumerate(lines) if re.fullmatch(r"\d+\+\d+", line)]
        assert len(starts) == len(terms) - 1 and starts[0] == 0
        total = terms[0]
        for term, begin, end in zip(terms[1:], starts, [*starts[1:], len(lines)]):
            block = lines[begin:end]
            a, b = map(int, block[0].split("+"))
            assert (a, b) == (total, term)  # each addition starts from the running total
            check_solution(Problem(3, "add", block[0] + "=?\n", "\n".join([*block, f"answer: {a + b}"]), str(a + b)))
            total += term
    # Heavy-tailed: most problems are short, the longest still occur.
    assert counts[2] > counts[3] > counts[4] > counts[6] > 0 and counts[2] > 900 and counts[max(LONG_TERMS)] > 0


def test_negative_differences_occur() -> None:
    problems = generate_problems(500, (1,), seed=3, split="train")
    assert any(p.answer.startswith("-") for p in problems if p.family == "sub")


def test_splits_are_disjoint_and_about_ten_percent() -> None:
    train = generate_problems(3000, (0, 1, 2), seed=1, split="train")
    heldout = generate_problems(3000, (0, 1, 2), seed=1, split="heldout")
    assert not {expression(p) for p in train} & {expression(p) for p in heldout}
    assert not any(is_heldout(p) for p in train) and all(is_heldout(p) for p in heldout)
    rng = random.Random(0)
    share = sum(is_heldout(generate_problem(rng, 1)) for _ in range(5000)) / 5000
    assert 0.07 < share < 0.13


def test_word_problem_shares_split_with_bare_arithmetic() -> None:
    word = next(p for p in generate_problems(200, (2,), seed=0, split="train") if p.family == "word")
    assert expression(word) == word.solution.split("\n")[0]
    assert re.fullmatch(r"\d+[+\-]\d+", expression(word))


def test_generation_is_deterministic() -> None:
    first = generate_problems(300, (0, 2), seed=7, split="train")
    assert first == generate_problems(300, (0, 2), seed=7, split="train")
    assert first != generate_problems(300, (0, 2), seed=8, split="train")
    assert list(iter_corpus_texts(50, seed=2)) == list(iter_corpus_texts(50, seed=2))


def test_tiers_are_assigned_round_robin() -> None:
    problems = generate_problems(9, (0, 2, 2), seed=0, split="train")
    assert [p.tier for p in problems] == [0, 2, 2] * 3


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="split"):
        generate_problems(1, (0,), seed=0, split="test")
    with pytest.raises(ValueError, match="tier"):
        generate_problem(random.Random(0), len(TIERS))


def test_format_document() -> None:
    problem = generate_problem(random.Random(0), 0)
    assert format_document(problem) == (problem.prompt, problem.solution)


def test_extract_answer_and_is_correct() -> None:
    problem = Problem(tier=1, family="sub", prompt="311-352=?\n", solution="-(352-311)\n...\nanswer: -41", answer="-41")
    assert extract_answer("12-1-0=1\nanswer: -41") == "-41"
    assert extract_answer("answer:  0105 \n") == "105"
    assert extract_answer("answer: 7\nanswer: 8") == "7"  # the first answer line counts
    assert is_correct("steps\nanswer: -41", problem)
    assert is_correct("answer: -041", problem)
    assert not is_correct("answer: 41", problem)
    for malformed in ("", "-41", "answer:", "answer: forty", "answer: 4 1", "the answer: -41", "answer: -41 apples"):
        assert extract_answer(malformed) is None, malformed
        assert not is_correct(malformed, problem)
