"""Prompt sets from files (SPEC §10): JSONL or Parquet rows in the field's shapes read into `Example`s, a stable-hash
train/held-out split, and the embedded arithmetic tiers (`linglab.tasks`) as the same `Example`s.

The shapes, and what each row becomes (prompt / reference answer / worked solution, the SFT target):

    gsm8k    {"question": Q, "answer": "...\\n#### 1,200"}       Q / "1200" (after the last ####, commas dropped) /
                                                                the whole answer text; a bare number as answer is
                                                                the reference, with no solution
    math     {"problem": P, "solution": "... \\boxed{\\frac{1}{2}}"}   P / the row's "answer" field if it has one
                                                                (MATH-500 does), else the last \\boxed{} of the
                                                                solution, braces matched / the solution
    generic  {"prompt": P, "answer": A, "solution": S}           P / A / S (optional)
    chat     {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...], "answer": A}
                                                                the conversation up to its last user message / A /
                                                                a final assistant message (A may then be absent)

Any row may carry "subset" (reported apart). `format="auto"` guesses the shape from the first row's fields, in the
order above (so question+answer is GSM8K, not generic); `fields` renames a shape's fields ({"prompt": "input"}), and
with `fields` given a row that fits no shape by its standard names is read as generic. Answers may be JSON numbers.
A malformed row is one error line, `data: {path}:{line}: {field}: {what is wrong}` (line: 1-based line of a JSONL
file, 1-based row of a Parquet file), or, with `skip_bad_rows`, skipped and counted.

    examples, shape, skipped = read_examples("gsm8k/train.jsonl")
    prompts = load_prompt_set("train.jsonl", heldout_percent=10)        # PromptSet(train, heldout, format, ...)
    prompts = embedded_prompt_set(tiers=[1, 2], seed=0, n_train=4096, n_heldout=32)
    write_jsonl(prompts.train, "tasks.jsonl")                           # the generic shape; reads back equal
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import linglab.tasks as tasks
from linglab.errors import LinglabError
from linglab.verify import last_boxed

FORMATS = ("auto", "gsm8k", "math", "generic", "chat")
SUFFIXES = (".jsonl", ".parquet")
ROLES = ("system", "user", "assistant")
MAX_REASONS = 5  # skipped rows' reasons kept in a PromptSet (the count is complete)

# Each shape's own field names, in the order "auto" tries the shapes; and the fields that make a row that shape.
_FIELDS = {
    "gsm8k": {"prompt": "question", "answer": "answer", "subset": "subset"},
    "math": {"prompt": "problem", "solution": "solution", "answer": "answer", "subset": "subset"},
    "chat": {"messages": "messages", "answer": "answer", "subset": "subset"},
    "generic": {"prompt": "prompt", "answer": "answer", "solution": "solution", "subset": "subset"},
}
_GUESSED_BY = {"gsm8k": ("prompt", "answer"), "math": ("prompt",), "chat": ("messages",), "generic": ("prompt", "answer")}
_DIGIT_COMMA = re.compile(r"(?<=\d),(?=\d)")


class DatasetError(LinglabError):
    """A prompt file that cannot be read as asked: one line naming the file, the line and the field."""


@dataclass(frozen=True)
class Example:
    """One prompt with its reference answer, as the verifier, SFT and the reports use it."""

    messages: tuple[tuple[str, str], ...]  # (role, content) up to the reply the model writes; else (("user", prompt),)
    answer: str  # the reference final answer the verifier compares against
    solution: str | None = None  # a worked solution, the SFT target
    subset: str = "all"  # reported separately: the embedded tier name, or a row's "subset" field
    source: str = field(default="", compare=False)  # "path:line", for messages; not part of what the example is

    @property
    def prompt(self) -> str:
        """The content of the last user message."""
        return next(content for role, content in reversed(self.messages) if role == "user")

    def chat(self) -> list[dict[str, str]]:
        """The messages as [{"role": ..., "content": ...}], for chat templates."""
        return [{"role": role, "content": content} for role, content in self.messages]


@dataclass
class PromptSet:
    """Train and held-out examples of one prompt set, with where they came from."""

    train: list[Example]
    heldout: list[Example]
    format: str  # the shape read ("gsm8k", "math", "generic", "chat"), or "embedded" for the tiers
    files: list[str]
    skipped: int = 0  # rows skipped under skip_bad_rows
    skipped_reasons: list[str] = field(default_factory=list)  # the first MAX_REASONS "path:line: field: reason" lines


# ---------------------------------------------------------------- rows


class _RowError(Exception):
    """What is wrong with one row: the field and a few words."""

    def __init__(self, field_name: str, what: str):
        super().__init__(f"{field_name}: {what}")


def _json_type(value) -> str:
    """The JSON name of a value's type, for people."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "an array"
    return "an object" if isinstance(value, dict) else type(value).__name__


def _text(row: dict, name: str, required: bool = True, number: bool = False) -> str | None:
    """The non-empty string field `name` (a number too if `number`, as its text); None if optional and absent."""
    if name not in row and required:
        raise _RowError(name, "missing")
    value = row.get(name)
    if value is None and not required:
        return None
    if number and isinstance(value, int | float) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise _RowError(name, f"expected a string{' or a number' if number else ''}, got {_json_type(value)}")
    if not value.strip():
        raise _RowError(name, "empty")
    return value


def _gsm8k(row: dict, names: dict[str, str]) -> tuple[tuple, str, str | None]:
    prompt, answer = _text(row, names["prompt"]), _text(row, names["answer"], number=True)
    if not isinstance(row[names["answer"]], str):
        return (("user", prompt),), answer, None
    if "####" not in answer:
        raise _RowError(names["answer"], "no final answer after '#### ' (GSM8K answers end with '#### <answer>')")
    final = _DIGIT_COMMA.sub("", answer.rsplit("####", 1)[1].strip())
    if not final:
        raise _RowError(names["answer"], "empty final answer after '####'")
    return (("user", prompt),), final, answer


def _math(row: dict, names: dict[str, str]) -> tuple[tuple, str, str | None]:
    prompt = _text(row, names["prompt"])
    solution = _text(row, names["solution"], required=False)
    answer = _text(row, names["answer"], required=False, number=True)
    if answer is None:
        if solution is None:
            raise _RowError(names["solution"], f"missing (a MATH row needs a solution with \\boxed{{...}} or an "
                                               f"{names['answer']!r} field)")
        boxed = last_boxed(solution)
        if boxed is None or not boxed.strip():
            raise _RowError(names["solution"], f"no \\boxed{{...}} answer and no {names['answer']!r} field")
        answer = boxed.strip()
    return (("user", prompt),), answer.strip(), solution


def _generic(row: dict, names: dict[str, str]) -> tuple[tuple, str, str | None]:
    prompt, answer = _text(row, names["prompt"]), _text(row, names["answer"], number=True)
    return (("user", prompt),), answer.strip(), _text(row, names["solution"], required=False)


def _chat(row: dict, names: dict[str, str]) -> tuple[tuple, str, str | None]:
    name = names["messages"]
    if name not in row:
        raise _RowError(name, "missing")
    messages = row[name]
    if not isinstance(messages, list):
        raise _RowError(name, f"expected an array of {{role, content}} objects, got {_json_type(messages)}")
    if not messages:
        raise _RowError(name, "empty")
    pairs = []
    for i, message in enumerate(messages, start=1):
        if not isinstance(message, dict):
            raise _RowError(name, f"message {i}: expected an object with role and content, got {_json_type(message)}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise _RowError(name, f"message {i}: role {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(content, str) or not content.strip():
            what = "empty" if isinstance(content, str) else f"expected a string, got {_json_type(content)}"
            raise _RowError(name, f"message {i}: content: {what}")
        pairs.append((role, content))
    solution = pairs.pop()[1] if pairs[-1][0] == "assistant" else None
    if not pairs or pairs[-1][0] != "user":
        raise _RowError(name, "the conversation must end with a user message (and then, optionally, the assistant's reply)")
    answer = _text(row, names["answer"], required=solution is None, number=True)
    return tuple(pairs), "" if answer is None else answer.strip(), solution


_PARSERS = {"gsm8k": _gsm8k, "math": _math, "chat": _chat, "generic": _generic}


def _example(row: dict, shape: str, names: dict[str, str], source: str) -> Example:
    messages, answer, solution = _PARSERS[shape](row, names)
    subset = _text(row, names["subset"], required=False, number=True)
    return Example(messages, answer, solution, "all" if subset is None else subset.strip(), source)


# ---------------------------------------------------------------- files


def _data_files(path: Path) -> list[Path]:
    """The file, or the directory's .jsonl/.parquet files sorted by name."""
    if not path.exists():
        raise DatasetError(f"data: {path}: no such file or directory")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES)
        if not files:
            raise DatasetError(f"data: {path}: a directory with no {' or '.join(SUFFIXES)} files")
        return files
    if path.suffix.lower() not in SUFFIXES:
        raise DatasetError(f"data: {path}: expected a {' or '.join(SUFFIXES)} file, or a directory of them")
    return [path]


def _jsonl_rows(path: Path) -> Iterator[tuple[int, object]]:
    """(line, row) per non-blank line; a line that is not UTF-8 or not JSON gives a _RowError as its row."""
    with path.open("rb") as f:
        for line, raw in enumerate(f, start=1):
            if line == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                yield line, _RowError("row", f"not UTF-8 text (byte {error.start + 1} of the line)")
                continue
            if not text.strip():
                continue
            try:
                yield line, json.loads(text)
            except json.JSONDecodeError as error:
                yield line, _RowError("row", f"not valid JSON ({error.msg} at column {error.colno})")


def _parquet_rows(path: Path) -> Iterator[tuple[int, object]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path, page_checksum_verification=True).to_pylist()
    except (pa.ArrowException, OSError, UnicodeDecodeError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DatasetError(f"data: {path}: not a readable Parquet file ({reason})") from None
    yield from enumerate(rows, start=1)


def _guess_shape(path: Path, line: int, row: dict, fields: dict[str, str]) -> str:
    for shape, keys in _GUESSED_BY.items():
        if all(_FIELDS[shape][key] in row for key in keys):
            return shape
    if fields:
        return "generic"
    seen = ", ".join(sorted(map(str, row))) or "none"
    raise DatasetError(f"data: {path}:{line}: cannot tell the shape from the fields ({seen}); expected question+answer "
                       "(gsm8k), problem (math), messages (chat) or prompt+answer (generic); give the format and field names")


def _field_names(shape: str, fields: dict[str, str], path: Path) -> dict[str, str]:
    """The shape's field names with the overrides applied; an override the shape does not read is an error."""
    unknown = sorted(set(fields) - set(_FIELDS[shape]))
    if unknown:
        raise DatasetError(f"data: {path}: field override {unknown[0]!r} does not apply to {shape} rows "
                           f"(their fields: {', '.join(_FIELDS[shape])})")
    return {**_FIELDS[shape], **fields}


def read_examples(path: str | Path, format: str = "auto", fields: dict[str, str] | None = None,
                  skip_bad_rows: bool = False) -> tuple[list[Example], str, list[str]]:
    """All examples of a file or directory, the shape read and the "path:line: field: reason" of skipped rows.

    Raises DatasetError for a missing, empty or unreadable file, an unknown format, or, without `skip_bad_rows`,
    the first malformed row; with it, for a file whose every row is malformed. Nothing is returned half-read.
    """
    if format not in FORMATS:
        raise DatasetError(f"data: unknown format {format!r}; expected one of {', '.join(FORMATS)}")
    fields = dict(fields or {})
    shape = None if format == "auto" else format
    names = None
    examples: list[Example] = []
    reasons: list[str] = []
    for file in _data_files(Path(path)):
        rows = _parquet_rows(file) if file.suffix.lower() == ".parquet" else _jsonl_rows(file)
        read, good, first_reason = 0, 0, ""
        for line, row in rows:
            read += 1
            try:
                if isinstance(row, _RowError):
                    raise row
                if not isinstance(row, dict):
                    raise _RowError("row", f"expected a JSON object, got {_json_type(row)}")
                if names is None:
                    shape = shape or _guess_shape(file, line, row, fields)
                    names = _field_names(shape, fields, file)
                examples.append(_example(row, shape, names, f"{file}:{line}"))
                good += 1
            except _RowError as error:
                reason = f"{file}:{line}: {error}"
                if not skip_bad_rows:
                    raise DatasetError(f"data: {reason}") from None
                reasons.append(reason)
                first_reason = first_reason or reason
        if read == 0:
            raise DatasetError(f"data: {file}: no rows")
        if good == 0:
            raise DatasetError(f"data: {file}: every row is malformed ({read} rows; the first: {first_reason})")
    return examples, shape, reasons


# ---------------------------------------------------------------- prompt sets


def _split_hash(example: Example) -> int:
    """A stable hash of what the model is asked (the prompt; a chat's rendered messages), the same in every process."""
    key = example.prompt if len(example.messages) == 1 else "\n".join(f"{r}: {c}" for r, c in example.messages)
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8, person=b"linglab-prompts").digest(), "big")


def split_heldout(examples: Sequence[Example], percent: int) -> tuple[list[Example], list[Example]]:
    """(train, held-out): an example is held out when its prompt's hash mod 100 < `percent`, so the same prompt is
    on the same side in every process, whatever the row order, and duplicates never straddle the split.

    With two or more examples each side gets at least one: when the hashes put all on one side, the examples of
    the hash nearest the boundary (the smallest hash when none is held out, the largest when all are) move across.
    """
    if not 1 <= percent <= 99:
        raise ValueError(f"percent must be in [1, 99], got {percent}")
    hashes = [_split_hash(e) for e in examples]
    held = [h % 100 < percent for h in hashes]
    if len(examples) >= 2 and len(set(held)) == 1:
        nearest = (max if held[0] else min)(hashes, key=lambda h: (h % 100, h))
        held = [was != (h == nearest) for h, was in zip(hashes, held)]
    return ([e for e, h in zip(examples, held) if not h], [e for e, h in zip(examples, held) if h])


def load_prompt_set(path: str | Path, eval_path: str | Path | None = None, format: str = "auto",
                    fields: dict[str, str] | None = None, skip_bad_rows: bool = False, heldout_percent: int = 10) -> PromptSet:
    """The prompt set of a file or directory: held out by `split_heldout`, or, with `eval_path`, all of `path` to
    train on and all of `eval_path` (read with the same format and fields) held out."""
    examples, shape, reasons = read_examples(path, format, fields, skip_bad_rows)
    files = [str(f) for f in _data_files(Path(path))]
    if eval_path:
        train = examples
        heldout, _, eval_reasons = read_examples(eval_path, format, fields, skip_bad_rows)
        files += [str(f) for f in _data_files(Path(eval_path))]
        reasons += eval_reasons
    else:
        train, heldout = split_heldout(examples, heldout_percent)
    return PromptSet(train, heldout, shape, files, len(reasons), reasons[:MAX_REASONS])


def example_from_problem(problem: tasks.Problem) -> Example:
    """An embedded arithmetic problem as an Example: its tier's name is the subset, the scratchpad the solution."""
    return Example((("user", problem.prompt),), problem.answer, problem.solution, tasks.TIERS[problem.tier].name)


def embedded_prompt_set(tiers: Sequence[int], seed: int, n_train: int, n_heldout: int) -> PromptSet:
    """The embedded tiers as a prompt set: `n_train` train-split problems of `tiers` (round-robin), and `n_heldout`
    held-out problems per distinct tier, in tier order (`tasks.heldout_problems`: the sets every job evaluates on)."""
    train = [example_from_problem(p) for p in tasks.generate_problems(n_train, tiers, seed, "train")]
    heldout = [example_from_problem(p) for group in tasks.heldout_problems(n_heldout, tiers, seed).values() for p in group]
    return PromptSet(train, heldout, "embedded", [])


def _row(example: Example, chat: bool) -> dict:
    row: dict = {}
    if chat:
        reply = [{"role": "assistant", "content": example.solution}] if example.solution is not None else []
        row["messages"] = example.chat() + reply
        if example.answer:
            row["answer"] = example.answer
    else:
        row = {"prompt": example.prompt, "answer": example.answer}
        if example.solution is not None:
            row["solution"] = example.solution
    if example.subset != "all":
        row["subset"] = example.subset
    return row


def write_jsonl(examples: Sequence[Example], path: str | Path) -> None:
    """The examples as JSONL in the generic shape ({"prompt", "answer", "solution", "subset"}; solution and subset
    left out when None / "all"), or in the chat shape when some example is more than one user message, so that
    `read_examples` reads them back equal. Written to a temporary file and renamed: never half a file."""
    chat = any(len(e.messages) != 1 or e.messages[0][0] != "user" for e in examples)
    text = "".join(json.dumps(_row(e, chat), ensure_ascii=False) + "\n" for e in examples)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)
