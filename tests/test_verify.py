"""The verifiers (SPEC §6, §10): numeric, math (math-verify), choice and exact, and verify_batch's error and time
limits."""

import threading
import time

import pytest

from linglab import verify as verify_module
from linglab.verify import VERIFIERS, default_verifier, extract_final_answer, math_final_answer, parse_number, verify, verify_batch

SCRATCHPAD = "47+58\n7+8+0=15\n4+5+1=10\nanswer: 105"


@pytest.mark.parametrize("completion, answer", [
    (SCRATCHPAD, "105"),
    ("answer: 12.0", "12"),
    ("answer: 24/2", "12"),
    ("so it is \\boxed{12}", "12.0"),
    ("answer: -7", "-7"),
    ("answer: 1,000", "1000"),
    ("answer: 1,234,567", "1234567.00"),
    ("the result is \\boxed{\\frac{3}{4}}.", "0.75"),
    ("answer: 3/4", "\\frac{3}{4}"),
    ("answer: \\dfrac{\\frac{1}{2}}{2}", "0.25"),
    ("answer: $2^{3} \\cdot 3$", "24"),
    ("answer: 2+3*4", "14"),
    ("so the total is 42.", "42"),
    ("we get -5 in the end", "-5"),
    ("Answer: 105 ", "105"),
    ("\\boxed{3}\nanswer: 4", "4"),
    ("answer: Paris", "paris"),
])
def test_numeric_accepts_equivalent_answers(completion, answer):
    assert verify(completion, answer)
    assert verify(completion, answer, kind="numeric")


@pytest.mark.parametrize("completion, answer", [
    (SCRATCHPAD, "104"),
    ("answer: 7", "-7"),
    ("answer: 1,00", "100"),
    ("answer: 105 apples", "105"),
    ("no number here", "0"),
    ("", "0"),
    ("answer: 1/0", "0"),
    ("answer: 0.33", "1/3"),
    ("12-5", "-5"),
    ("answer: banana", "42"),
])
def test_numeric_rejects(completion, answer):
    assert not verify(completion, answer)


def test_extraction_order_and_huge_powers_are_refused_quickly():
    assert extract_final_answer("\\boxed{\\frac{1}{2}} then 7") == "\\frac{1}{2}"
    assert extract_final_answer("answer: 3\nanswer: 5\n") == "5"
    start = time.perf_counter()
    assert parse_number("9^9^9") is None and parse_number("(2**64)**64") is None
    assert time.perf_counter() - start < 1.0
    assert parse_number("-3.25") == pytest.approx(-3.25)


@pytest.mark.parametrize("completion, reference", [
    ("so \\boxed{\\frac{1}{2}}", "0.5"),
    ("answer: 1/2", "\\frac{1}{2}"),
    ("\\boxed{0.5}", "1/2"),
    ("hence \\boxed{2\\sqrt{2}}.", "\\sqrt{8}"),
    ("\\boxed{\\{2, 1\\}}", "\\{1,2\\}"),
    ("\\boxed{[0, 1)}", "[0,1)"),
    ("\\boxed{x=3}", "3"),
    ("We find $x = 3$ in the end.", "3"),
    ("\\boxed{\\dfrac{\\pi}{2}}", "\\pi/2"),
    ("\\boxed{(x+1)^2}", "x^2+2x+1"),
    ("The total is 1,000", "1000"),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "$\\frac{\\sqrt 3}{2}$"),
])
def test_math_accepts_equivalent_answers(completion, reference):
    assert verify(completion, reference, kind="math")


@pytest.mark.parametrize("completion, reference", [
    ("\\boxed{[0, 1]}", "[0,1)"),
    ("\\boxed{(-\\infty, 3)}", "(-\\infty, 3]"),
    ("\\boxed{\\frac{1}{3}}", "0.33"),
    ("\\boxed{2\\sqrt{3}}", "\\sqrt{8}"),
    ("\\boxed{-3}", "3"),
    ("\\boxed{(2, 1)}", "(1, 2)"),
    ("\\boxed{5}\nsome more words", "6"),
    ("no answer at all", "6"),
])
def test_math_rejects(completion, reference):
    assert not verify(completion, reference, kind="math")


def test_math_final_answer_order():
    assert math_final_answer("answer: 4\nso \\boxed{\\frac{1}{2}} then 7") == "\\frac{1}{2}"
    assert math_final_answer("x is 3\nanswer: 4") == "4"
    assert math_final_answer("first $a$, then $\\sqrt{2}$ and 7") == "\\sqrt{2}"
    assert math_final_answer("first 5 then 7.") == "7"
    assert math_final_answer("none") is None


def test_math_works_off_the_main_thread():
    # math-verify's own timeout (signal.alarm) raises there; ours is off, so the call just works.
    results = []
    thread = threading.Thread(target=lambda: results.append(verify("\\boxed{\\frac{1}{2}}", "0.5", kind="math")))
    thread.start()
    thread.join()
    assert results == [True]


@pytest.mark.parametrize("completion, reference, expected", [
    ("The answer is (c).", "C", True),
    ("The answer is C", "C", True),
    ("the answer is: b", "(B)", True),
    ("answer: B", "(B)", True),
    ("so \\boxed{D}", "d", True),
    ("(E)", "E", True),
    ("A.", "A", True),
    ("The answer is (C) because of the parity.", "C", True),
    ("answer: B", "C", False),
    ("The answer is a bit unclear", "A", False),
    ("answer: F", "F", False),
    ("I think it is C or D", "C", False),
    ("answer: Paris", "A", False),
    ("", "A", False),
])
def test_choice(completion, reference, expected):
    assert verify(completion, reference, kind="choice") is expected


@pytest.mark.parametrize("completion, reference, expected", [
    ("answer: \\text{Paris}.", "paris", True),
    ("The capital:\n  New   York ", "new york", True),
    ("\\boxed{$\\text{blue}$}", "Blue", True),
    ("answer: 12", "12", True),
    ("answer: 12.0", "12", False),
    ("answer: Pariss", "Paris", False),
    ("", "", False),
])
def test_exact(completion, reference, expected):
    assert verify(completion, reference, kind="exact") is expected


def test_unknown_kind_is_a_value_error():
    with pytest.raises(ValueError, match="unknown verifier 'sympy'"):
        verify("answer: 1", "1", kind="sympy")
    with pytest.raises(ValueError, match="unknown verifier"):
        verify_batch(["answer: 1"], ["1"], kind="sympy")
    with pytest.raises(ValueError, match="2 completions for 1 references"):
        verify_batch(["a", "b"], ["1"])


def test_default_verifier_per_format():
    assert default_verifier("math") == "math"
    assert [default_verifier(f) for f in ("gsm8k", "generic", "chat", "embedded")] == ["numeric"] * 4
    assert set(VERIFIERS) == {"numeric", "math", "choice", "exact", "code"}


def test_batch_counts_an_exception_and_scores_the_rest(monkeypatch):
    def flaky(completion, reference):
        if completion == "boom":
            raise RuntimeError("verifier bug")
        return completion == reference

    monkeypatch.setitem(verify_module._BY_KIND, "exact", flaky)
    scores, counts = verify_batch(["a", "boom", "c"], ["a", "b", "c"], kind="exact")
    assert scores == [True, False, True]
    assert counts == {"verifier_errors": 1, "verifier_timeouts": 0}


def test_batch_times_out_a_stuck_verifier_and_goes_on(monkeypatch):
    def slow(completion, reference):
        if completion == "stuck":
            time.sleep(60)
        return completion == reference

    monkeypatch.setitem(verify_module._BY_KIND, "exact", slow)
    start = time.perf_counter()
    scores, counts = verify_batch(["a", "stuck", "c", "stuck"], ["a", "stuck", "c", "x"], kind="exact", timeout_s=0.5)
    assert time.perf_counter() - start < 10
    assert scores == [True, False, True, False]
    assert counts == {"verifier_errors": 0, "verifier_timeouts": 2}


def test_batch_survives_a_pathological_math_answer():
    start = time.perf_counter()
    scores, counts = verify_batch(["\\boxed{9^{9^{9^{9}}}}", "\\boxed{\\frac12}"], ["5", "0.5"], kind="math", timeout_s=1.0)
    assert scores == [False, True]
    assert counts["verifier_timeouts"] == 1 and time.perf_counter() - start < 20


def test_batch_of_numeric_answers_costs_well_under_a_millisecond_each():
    completions = [f"7+8+0=15\nanswer: {i}" for i in range(1000)]
    start = time.perf_counter()
    scores, counts = verify_batch(completions, [str(i) for i in range(1000)])
    per_call = (time.perf_counter() - start) / 1000
    assert all(scores) and counts == {"verifier_errors": 0, "verifier_timeouts": 0}
    assert per_call < 1e-3, f"{per_call * 1e6:.0f} us per completion"
    assert verify_batch([], []) == ([], {"verifier_errors": 0, "verifier_timeouts": 0})
