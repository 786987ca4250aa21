"""Final-answer verification, shared by the evaluations (`linglab.evals`) and the RL rewards (`linglab.rl.rewards`).

The verifier reads the final answer (the `answer: X` line of linglab's tasks, else the last \\boxed{X},
else the last number) and compares values exactly, as fractions: "12" == "12.0" == "24/2" == "\\frac{24}{2}",
"1,000" == "1000". Answers that are not numbers fall back to a normalised string match. No sympy: the
embedded tasks are integer arithmetic, and a small exact evaluator of + - * / ^ covers them.

    verify("47+58\\n7+8+0=15\\n4+5+1=10\\nanswer: 105", "105")        # True
"""

from __future__ import annotations

import ast
import operator
import re
from fractions import Fraction

_BOXED = "\\boxed{"

ANSWER_LINE = re.compile(r"[ \t]*answer:[ \t]*(\S.*?)[ \t]*", re.IGNORECASE)
# A number not glued to a word or a preceding digit run: "-3", "1,000", "3.14", "24/2" ("5-3" yields "3").
_NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?(?!\d)")
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_DECIMAL = re.compile(r"(\d*)\.(\d+)")
_FRAC = re.compile(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}")
_LATEX_SPACING = re.compile(r"\\[,!;: ]|\\left|\\right|\$")
_MAX_BITS = 4096  # bound on a power's size, so that "9^9^9" is rejected rather than computed
_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _closing_brace(text: str, begin: int) -> int | None:
    """The index of the brace closing the group whose content starts at `begin`; None if unbalanced."""
    depth = 1
    for i in range(begin, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return i
    return None


def _last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...}, braces matched; None if there is none."""
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    begin = start + len(_BOXED)
    end = _closing_brace(text, begin)
    return None if end is None else text[begin:end]


def extract_final_answer(completion: str) -> str | None:
    """The final answer as written: the last `answer: X` line, else the last \\boxed{X}, else the last number."""
    for line in reversed(completion.splitlines()):
        match = ANSWER_LINE.fullmatch(line)
        if match:
            return match.group(1)
    boxed = _last_boxed(completion)
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


def _normalise(text: str) -> str:
    return " ".join(text.replace("$", "").strip().rstrip(".").casefold().split())


def verify(completion: str, answer: str) -> bool:
    """Whether the completion's final answer equals `answer`: exactly as numbers when both parse, else as text."""
    predicted = extract_final_answer(completion)
    if predicted is None:
        return False
    gold, value = parse_number(answer), parse_number(predicted)
    if gold is not None:
        return value == gold
    return _normalise(predicted) == _normalise(answer)
