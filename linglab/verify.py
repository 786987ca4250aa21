"""Final-answer verifiers (SPEC §6, §10), shared by the evaluations (`linglab.evals`) and the RL rewards (`linglab.rl.rewards`).

`verify(completion, reference, kind)` is the one entry point; each kind is one function:

    numeric  the final answer (the last `answer: X` line, else the last \\boxed{X}, else the last number) equals the
             reference exactly as a fraction: "12" == "12.0" == "24/2" == "\\frac{24}{2}", "1,000" == "1000"; answers
             that are not numbers fall back to `exact`. No sympy: a small evaluator of + - * / ^ covers the tiers.
                 verify("47+58\\n7+8+0=15\\n4+5+1=10\\nanswer: 105", "105")                      # True
    math     symbolic equivalence by the math-verify package (LaTeX -> sympy) of the final answer (the last
             \\boxed{X}, else the last `answer: X` line, else the last $...$ span, else the last number) and the
             reference, each wrapped in $...$ unless already delimited (math-verify reads undelimited LaTeX badly):
             \\frac{1}{2} == 0.5 == 1/2, 2\\sqrt{2} == \\sqrt{8}, \\{1,2\\} == \\{2,1\\}, [0, 1) != [0, 1], x=3 == 3.
                 verify("so the answer is \\boxed{2\\sqrt{2}}", "\\sqrt{8}", kind="math")         # True
    choice   a letter A-E, any case, from \\boxed{C}, "answer: C", "The answer is C" / "(C)", or a last line that is
             only "C", "(C)" or "C."; the reference is a letter or "(C)". Anything else is wrong.
                 verify("The answer is (c).", "C", kind="choice")                                # True
    exact    normalised string equality of the final answer (`answer: X` line, else \\boxed{X}, else the last
             non-empty line) and the reference: casefolded, whitespace collapsed, `$`, a trailing period and a
             surrounding \\text{...} dropped.
                 verify("answer: \\text{Paris}.", "paris", kind="exact")                         # True
    code     the answer's Python (the last ```python fenced block, else the whole completion) with the reference
             appended as its tests (asserts), run by `linglab.sandbox.run_sandboxed` (own directory, time, memory
             and file limits, no processes, no network, no writes outside): correct iff it exits 0.
                 verify("```python\\ndef f(x):\\n    return 2 * x\\n```", "assert f(2) == 4", kind="code")  # True

Time limits. `verify` has none. `verify_batch` scores a batch in a forked child process and gives each item
`timeout_s`: an item that overruns scores False and is counted, the child is killed and a new one forked for the
rest. A process is the only sound choice: sympy can sit in one C call holding the GIL (on \\boxed{9^{9^{9^{9}}}}
a 2 s SIGALRM had not interrupted it after 40 s), which neither signal.setitimer (its handler runs between
bytecodes, and only in the main thread) nor a watchdog thread can interrupt; a kill always returns. Forking, rather
than a spawned pool, needs no pickling or re-import and works from any thread (POSIX only); the child runs only
the verifier and touches neither torch nor CUDA, which is what makes forking a trainer's process sound. The cost
is one fork per call and one pipe message per item: 40-100 us per short numeric completion over a batch of 1000,
against 10-20 us for `verify` itself (2 shared CPU cores; tests/test_verify.py holds it under 1 ms), so score a
whole batch per call. math-verify's own timeouts (signal.alarm: main thread only, and it replaces the caller's
SIGALRM handler) are turned off; the child's time limit replaces them.

Parallel scoring (SPEC §9: rewards computed in parallel, outside the trainer). `verify_batch(..., workers=N)` splits
the batch into N contiguous shards, each scored by its own child, all started from the calling thread and watched
from it with `multiprocessing.connection.wait`. `code` answers spend their time in their sandbox subprocess, so N workers
run N sandboxes at once. `RewardPool` runs such batches in the background, so rewards overlap generation.
"""

from __future__ import annotations

import ast
import logging
import multiprocessing
import operator
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from fractions import Fraction
from multiprocessing.connection import wait

from linglab.sandbox import DEFAULT_LIMITS, SandboxLimits, run_sandboxed

VERIFIERS = ("numeric", "math", "choice", "exact", "code")

_BOXED = "\\boxed{"
_TEXT = "\\text{"

ANSWER_LINE = re.compile(r"[ \t]*answer:[ \t]*(\S.*?)[ \t]*", re.IGNORECASE)
# A number not glued to a word or a preceding digit run: "-3", "1,000", "3.14", "24/2" ("5-3" yields "3").
_NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?(?!\d)")
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_DECIMAL = re.compile(r"(\d*)\.(\d+)")
_FRAC = re.compile(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}")
_LATEX_SPACING = re.compile(r"\\[,!;: ]|\\left|\\right|\$")
_MAX_BITS = 4096  # bound on a power's size, so that "9^9^9" is rejected rather than computed
_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}

_MATH_SPAN = re.compile(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.DOTALL)
_DELIMITED = re.compile(r"\$.*\$|\\\(.*\\\)|\\\[.*\\\]", re.DOTALL)
_LETTER = re.compile(r"\(?([A-E])\)?\.?", re.IGNORECASE)
# "The answer is (C) since ..." or a bare letter ending its line ("The answer is C."), not "the answer is a bit ...".
_ANSWER_IS = re.compile(r"answer is:?[ \t]*(?:\(([A-E])\)|([A-E])(?=[ \t]*[.)]?[ \t]*$))", re.IGNORECASE | re.MULTILINE)


def _closing_brace(text: str, begin: int) -> int | None:
    """The index of the brace closing the group whose content starts at `begin`; None if unbalanced."""
    depth = 1
    for i in range(begin, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return i
    return None


def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...}, braces matched (\\boxed{\\frac{1}{2}} -> \\frac{1}{2}); None if there is none."""
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    begin = start + len(_BOXED)
    end = _closing_brace(text, begin)
    return None if end is None else text[begin:end]


def _answer_line(completion: str) -> str | None:
    """The X of the last `answer: X` line."""
    for line in reversed(completion.splitlines()):
        match = ANSWER_LINE.fullmatch(line)
        if match:
            return match.group(1)
    return None


def extract_final_answer(completion: str) -> str | None:
    """The final answer as written: the last `answer: X` line, else the last \\boxed{X}, else the last number."""
    answer = _answer_line(completion)
    if answer is not None:
        return answer
    boxed = last_boxed(completion)
    if boxed is not None:
        return boxed.strip()
    numbers = _NUMBER.findall(completion)
    return numbers[-1] if numbers else None


def _evaluate(node: ast.expr) -> Fraction:
    """The exact value of an arithmetic expression tree of integers, + - * / and integer powers."""
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return Fraction(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        value = _evaluate(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](_evaluate(node.left), _evaluate(node.right))
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
        base, exponent = _evaluate(node.left), _evaluate(node.right)
        size = max(base.numerator.bit_length(), base.denominator.bit_length())
        if exponent.denominator != 1 or abs(exponent.numerator) * size > _MAX_BITS:
            raise ValueError("power too large or not an integer power")
        return base ** exponent.numerator
    raise ValueError(f"not arithmetic: {ast.dump(node)}")


def parse_number(text: str) -> Fraction | None:
    """The exact value of a numeric answer (integer, decimal, fraction, LaTeX \\frac, simple expression); None if not one."""
    s = _LATEX_SPACING.sub("", text.strip()).rstrip(".").replace("−", "-")
    if s.startswith(_BOXED) and _closing_brace(s, len(_BOXED)) == len(s) - 1:
        s = s[len(_BOXED):-1]
    s = _THOUSANDS_COMMA.sub("", s)
    while _FRAC.search(s):
        s = _FRAC.sub(r"((\1)/(\2))", s)
    s = s.replace("\\cdot", "*").replace("\\times", "*").replace("\\div", "/").replace("^", "**")
    s = s.replace("{", "(").replace("}", ")")
    # Decimals become exact fractions before parsing, so no float ever rounds a value.
    s = _DECIMAL.sub(lambda m: f"({int(m.group(1) + m.group(2))}/{10 ** len(m.group(2))})", s)
    try:
        return _evaluate(ast.parse(s, mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError, RecursionError, MemoryError):
        return None


def normalise_answer(text: str) -> str:
    """An answer for string comparison: `$` dropped, a trailing period and a surrounding \\text{...} dropped,
    casefolded, whitespace collapsed."""
    s = text.replace("$", "").strip().rstrip(".").strip()
    if s.startswith(_TEXT) and _closing_brace(s, len(_TEXT)) == len(s) - 1:
        s = s[len(_TEXT):-1].strip().rstrip(".")
    return " ".join(s.casefold().split())


# ---------------------------------------------------------------- the verifiers, one per kind


def verify_numeric(completion: str, reference: str) -> bool:
    """Exact numeric comparison of the final answer (`extract_final_answer`); `exact` when the reference is no number."""
    predicted = extract_final_answer(completion)
    if predicted is None:
        return False
    gold, value = parse_number(reference), parse_number(predicted)
    if gold is not None:
        return value == gold
    return normalise_answer(predicted) == normalise_answer(reference)


def math_final_answer(completion: str) -> str | None:
    """The final answer of a math completion: the last \\boxed{X}, else the last `answer: X` line, else the last
    $...$ (or \\(...\\), \\[...\\]) span, else the last number."""
    for answer in (last_boxed(completion), _answer_line(completion)):
        if answer is not None:
            return answer.strip()
    spans = _MATH_SPAN.findall(completion)
    if spans:
        return next(group for group in spans[-1] if group).strip()
    numbers = _NUMBER.findall(completion)
    return numbers[-1] if numbers else None


def _as_latex(answer: str) -> str:
    """The answer delimited for math-verify, which parses `$2\\sqrt{2}$` as 2*sqrt(2) but bare `2\\sqrt{2}` as 2."""
    answer = answer.strip()
    return answer if _DELIMITED.fullmatch(answer) else f"${answer}$"


def _math_verify():
    """math-verify's (parse, verify), imported on first use: it takes half a second and only `math` needs it."""
    from math_verify import parse, verify

    # Its timeouts are off (our process limit replaces them); its one-time warning that they are off is noise.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    return parse, verify


def verify_math(completion: str, reference: str) -> bool:
    """Symbolic equivalence of `math_final_answer` and the reference by math-verify (SPEC §6: a verifier, not string
    match); a reference math-verify cannot parse is compared as `exact`. No time limit of its own (see the module
    docstring): `verify_batch` gives one."""
    parse, equivalent = _math_verify()
    predicted = math_final_answer(completion)
    if predicted is None:
        return False
    gold = parse(_as_latex(reference), parsing_timeout=None)
    if not gold:
        return normalise_answer(predicted) == normalise_answer(reference)
    return equivalent(gold, parse(_as_latex(predicted), parsing_timeout=None), timeout_seconds=None)


def _choice_letter(text: str) -> str | None:
    """The letter A-E that `text` consists of ("C", "(c)", "C.", "$\\text{(C)}$"), upper-cased; None otherwise."""
    s = text.replace("$", "").strip()
    if s.startswith(_TEXT) and _closing_brace(s, len(_TEXT)) == len(s) - 1:
        s = s[len(_TEXT):-1].strip()
    match = _LETTER.fullmatch(s)
    return match.group(1).upper() if match else None


def verify_choice(completion: str, reference: str) -> bool:
    """Multiple choice: the letter of the last \\boxed{X}, else of the `answer: X` line, else of the last "answer is
    X" phrase, else the last non-empty line when it is only a letter; equal to the reference's letter."""
    gold = _choice_letter(reference)
    if gold is None:
        return False
    final = last_boxed(completion)
    if final is None:
        final = _answer_line(completion)
    if final is None:
        phrases = _ANSWER_IS.findall(completion)
        if phrases:
            return "".join(phrases[-1]).upper() == gold
        lines = completion.strip().splitlines()
        final = lines[-1] if lines else ""
    return _choice_letter(final) == gold


def verify_exact(completion: str, reference: str) -> bool:
    """Normalised string equality (`normalise_answer`) of the final answer (the `answer: X` line, else the last
    \\boxed{X}, else the last non-empty line) and the reference."""
    final = _answer_line(completion)
    if final is None:
        final = last_boxed(completion)
    if final is None:
        lines = completion.strip().splitlines()
        final = lines[-1] if lines else ""
    return bool(final.strip()) and normalise_answer(final) == normalise_answer(reference)


_FENCED = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)
CODE_TIMEOUT_MARGIN_S = 5.0  # verify_batch's per-item limit for `code` over the sandbox's own wall clock


def code_answer(completion: str) -> str:
    """The answer's program: the last fenced ```python (or ```py, or bare ```) block, else the whole completion."""
    blocks = _FENCED.findall(completion)
    return blocks[-1] if blocks else completion


def verify_code(completion: str, reference: str, limits: SandboxLimits = DEFAULT_LIMITS) -> bool:
    """The answer's program followed by the reference's tests (Python asserts), run in `run_sandboxed`: correct iff
    it exits 0 within the limits. An empty reference is refused (ValueError): with no tests every program passes."""
    if not reference.strip():
        raise ValueError("code verifier: the reference holds no tests")
    return run_sandboxed(f"{code_answer(completion)}\n\n{reference}\n", limits).passed


_BY_KIND: dict[str, Callable[[str, str], bool]] = {
    "numeric": verify_numeric, "math": verify_math, "choice": verify_choice, "exact": verify_exact,
    "code": verify_code}


def _verifier(kind: str) -> Callable[[str, str], bool]:
    if kind not in _BY_KIND:
        raise ValueError(f"unknown verifier {kind!r}; expected one of {', '.join(VERIFIERS)}")
    return _BY_KIND[kind]


def verify(completion: str, reference: str, kind: str = "numeric") -> bool:
    """Whether the completion's final answer matches the reference under verifier `kind` (one of VERIFIERS)."""
    return _verifier(kind)(completion, reference)


def default_verifier(format: str) -> str:
    """The verifier of a prompt-set shape (`rl.verifier = "auto"`): "math" for MATH rows, "numeric" otherwise."""
    return "math" if format == "math" else "numeric"


# ---------------------------------------------------------------- batches, with a time limit per item


def _score_items(sender, verifier: Callable[[str, str], bool], completions: Sequence[str],
                 references: Sequence[str]) -> None:
    """A child's loop: one message per item, its score or None when the verifier raised."""
    for completion, reference in zip(completions, references):
        try:
            outcome = bool(verifier(completion, reference))
        except Exception:
            outcome = None
        sender.send(outcome)


class _Shard:
    """Items [next, end) scored by one forked child; `deadline` is when the item it is on runs out of time."""

    def __init__(self, context, verifier, completions, references, start: int, end: int, timeout_s: float):
        self.next, self.end, self.timeout_s = start, end, timeout_s
        self.receiver, sender = context.Pipe(duplex=False)
        self.child = context.Process(target=_score_items, daemon=True,
                                     args=(sender, verifier, completions[start:end], references[start:end]))
        self.child.start()
        sender.close()
        self.deadline = time.monotonic() + timeout_s

    def close(self) -> None:
        self.child.kill()
        self.child.join()
        self.receiver.close()


def verify_batch(completions: Sequence[str], references: Sequence[str], kind: str = "numeric",
                 timeout_s: float | None = None, workers: int = 1,
                 start_method: str = "fork") -> tuple[list[bool], dict[str, int]]:
    """Scores many completions in `workers` forked children (see the module docstring); a verifier that raises or
    runs past `timeout_s` on an item (default 5 s; for `code` the sandbox's wall clock + CODE_TIMEOUT_MARGIN_S) scores
    it False and is counted in {"verifier_errors": n, "verifier_timeouts": n}, and a new child takes over the rest
    of that shard. `start_method` "forkserver" starts the children from a clean server process instead of forking the
    caller: what a call from a background thread needs (`RewardPool`). Raises only ValueError (unknown kind, lengths
    differ, workers < 1)."""
    verifier = _verifier(kind)
    completions, references = list(completions), list(references)
    if len(completions) != len(references):
        raise ValueError(f"{len(completions)} completions for {len(references)} references")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if timeout_s is None:
        timeout_s = DEFAULT_LIMITS.timeout_s + CODE_TIMEOUT_MARGIN_S if kind == "code" else 5.0
    if kind == "math":
        _math_verify()  # imported once here, not in every forked child
    scores = [False] * len(completions)
    counts = {"verifier_errors": 0, "verifier_timeouts": 0}
    context = multiprocessing.get_context(start_method)
    n = len(completions)
    bounds = [n * w // workers for w in range(workers + 1)]

    def shard(start: int, end: int) -> _Shard:
        return _Shard(context, verifier, completions, references, start, end, timeout_s)

    active = [shard(a, b) for a, b in zip(bounds, bounds[1:]) if a < b]
    try:
        while active:
            now = time.monotonic()
            ready = set(wait([s.receiver for s in active], timeout=max(0.0, min(s.deadline for s in active) - now)))
            for s in list(active):
                if s.receiver in ready:
                    try:
                        outcome = s.receiver.recv()
                    except EOFError:  # the child died (a verifier that took its process down)
                        outcome, lost = None, True
                    else:
                        lost = False
                    if outcome is None:
                        counts["verifier_errors"] += 1
                    else:
                        scores[s.next] = outcome
                    s.next += 1
                    s.deadline = time.monotonic() + timeout_s
                elif time.monotonic() >= s.deadline:
                    counts["verifier_timeouts"] += 1
                    s.next += 1
                    lost = True
                else:
                    continue
                if s.next >= s.end or lost:
                    s.close()
                    active.remove(s)
                    if s.next < s.end:
                        active.append(shard(s.next, s.end))
    finally:
        for s in active:
            s.close()
    return scores, counts


class RewardPool:
    """Scores batches in the background (`verify_batch` with `workers` children), so a trainer can go on generating
    while the last groups are verified: `pool.submit(completions, answers).result()` -> (scores, counts).

    The batches run in one background thread, so its children start from a forkserver (a clean process started
    once), never by forking a process whose main thread is busy generating."""

    def __init__(self, kind: str, workers: int = 1, timeout_s: float | None = None):
        _verifier(kind)
        # The server imports these once; every child it starts then has them (math-verify takes half a second).
        multiprocessing.get_context("forkserver").set_forkserver_preload(
            ["linglab.verify"] + (["math_verify"] if kind == "math" else []))
        self.kind, self.workers, self.timeout_s = kind, workers, timeout_s
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="linglab-rewards")

    def submit(self, completions: Sequence[str], references: Sequence[str]) -> Future:
        return self._executor.submit(verify_batch, list(completions), list(references), self.kind, self.timeout_s,
                                     self.workers, "forkserver")

    def close(self) -> None:
        self._executor.shutdown(wait=True)

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
