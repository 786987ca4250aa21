"""Prompt sets from files (SPEC §10): each shape from hand-written rows, JSONL and Parquet, the one-line errors,
skip_bad_rows, the stable held-out split, write_jsonl and `linglab tasks export`."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from linglab.cli import main
from linglab.config import RLConfig
from linglab.datasets import (
    DatasetError,
    Example,
    embedded_prompt_set,
    example_from_problem,
    load_prompt_set,
    read_examples,
    split_heldout,
    write_jsonl,
)
from linglab.rl.sft import EVAL_TIERS
from linglab.tasks import generate_problems

GSM8K = [{"question": "Ann has 1,000 coins and finds 200 more. How many now?",
          "answer": "1,000 + 200 = 1,200\n#### 1,200"},
         {"question": "What is 6 times 7?", "answer": 42, "subset": "easy"}]
MATH = [{"problem": "Compute 1/2 as a fraction.", "solution": "It is $\\boxed{\\frac{1}{2}}$.", "level": "Level 1"},
        {"problem": "Solve x+1=4.", "solution": "x = 3, so \\boxed{3}.", "answer": "3", "subset": "algebra"}]
GENERIC = [{"prompt": "2+2=?\n", "answer": "4", "solution": "2+2\nanswer: 4"}, {"prompt": "Capital of France?", "answer": "Paris"}]
CHAT = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "3+4?"}], "answer": "7"},
        {"messages": [{"role": "user", "content": "5+5?"}, {"role": "assistant", "content": "answer: 10"}], "answer": 10},
        {"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]}]


def write_rows(path, rows, lines=None):
    """Rows as JSONL (or the raw `lines` when given); returns the path."""
    path.write_text("".join(line + "\n" for line in (lines if lines is not None else map(json.dumps, rows))),
                    encoding="utf-8")
    return path


def write_parquet(path, rows):
    """Rows as one Parquet table; a field a row lacks is null there."""
    keys = dict.fromkeys(key for row in rows for key in row)
    pq.write_table(pa.Table.from_pydict({key: [row.get(key) for row in rows] for key in keys}), path)
    return path


def read_error(path, **kwargs) -> str:
    with pytest.raises(DatasetError) as info:
        read_examples(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------- shapes


def test_gsm8k_rows(tmp_path):
    examples, shape, skipped = read_examples(write_rows(tmp_path / "g.jsonl", GSM8K))
    assert shape == "gsm8k" and skipped == []
    first, second = examples
    assert first.prompt == GSM8K[0]["question"] and first.messages == (("user", GSM8K[0]["question"]),)
    assert first.answer == "1200" and first.solution == GSM8K[0]["answer"] and first.subset == "all"
    assert (second.answer, second.solution, second.subset) == ("42", None, "easy")
    assert first.source.endswith("g.jsonl:1") and second.source.endswith("g.jsonl:2")


def test_math_rows_take_the_last_boxed_with_matched_braces_or_the_answer_field(tmp_path):
    examples, shape, _ = read_examples(write_rows(tmp_path / "m.jsonl", MATH))
    assert shape == "math"
    assert [e.answer for e in examples] == ["\\frac{1}{2}", "3"]
    assert examples[0].solution == MATH[0]["solution"] and examples[1].subset == "algebra"


def test_generic_and_chat_rows(tmp_path):
    examples, shape, _ = read_examples(write_rows(tmp_path / "p.jsonl", GENERIC))
    assert shape == "generic"
    assert examples[0] == Example((("user", "2+2=?\n"),), "4", "2+2\nanswer: 4")
    assert examples[1].solution is None and examples[1].answer == "Paris"
    examples, shape, _ = read_examples(write_rows(tmp_path / "c.jsonl", CHAT))
    assert shape == "chat"
    assert examples[0].messages == (("system", "Be brief."), ("user", "3+4?")) and examples[0].prompt == "3+4?"
    assert examples[0].chat() == CHAT[0]["messages"] and examples[0].solution is None
    # A final assistant message is the solution, not part of the prompt; a reply without an answer is SFT data.
    assert examples[1].messages == (("user", "5+5?"),) and (examples[1].answer, examples[1].solution) == ("10", "answer: 10")
    assert (examples[2].answer, examples[2].solution) == ("", "hi")


# A Parquet column has one type: the numeric answers of GSM8K and CHAT are written as text there.
@pytest.mark.parametrize("rows, shape", [
    ([GSM8K[0], {"question": "6*7?", "answer": "6*7 = 42\n#### 42", "subset": "easy"}], "gsm8k"),
    (MATH, "math"), (GENERIC, "generic"), ([*CHAT[:1], {**CHAT[1], "answer": "10"}, CHAT[2]], "chat")])
def test_parquet_and_directories_read_like_jsonl(tmp_path, rows, shape):
    expected, _, _ = read_examples(write_rows(tmp_path / "rows.jsonl", rows))
    parquet, got, _ = read_examples(write_parquet(tmp_path / "rows.parquet", rows))
    assert parquet == expected and got == shape
    assert parquet[1].source.endswith("rows.parquet:2")
    directory = tmp_path / "dir"
    directory.mkdir()
    write_parquet(directory / "b.parquet", rows[1:])
    write_rows(directory / "a.jsonl", rows[:1])
    (directory / "notes.txt").write_text("ignored")
    examples, got, _ = read_examples(directory)
    assert examples == expected and got == shape  # a.jsonl before b.parquet: sorted by name


def test_auto_prefers_gsm8k_and_fields_rename(tmp_path):
    both = [{"question": "q", "prompt": "p", "answer": "x\n#### 3"}]
    assert read_examples(write_rows(tmp_path / "both.jsonl", both))[1] == "gsm8k"
    odd = write_rows(tmp_path / "odd.jsonl", [{"input": "1+1?", "target": 2, "why": "1+1\nanswer: 2"}])
    fields = {"prompt": "input", "answer": "target", "solution": "why"}
    for format in ("generic", "auto"):
        examples, shape, _ = read_examples(odd, format=format, fields=fields)
        assert shape == "generic" and examples == [Example((("user", "1+1?"),), "2", "1+1\nanswer: 2")]
    renamed = write_rows(tmp_path / "q.jsonl", [{"query": "6*7?", "response": "6*7\n#### 42"}])
    assert read_examples(renamed, format="gsm8k", fields={"prompt": "query", "answer": "response"})[0][0].answer == "42"


def test_bom_blank_lines_and_crlf_are_tolerated(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GENERIC[0]).encode() + b"\r\n\r\n  \n" + json.dumps(GENERIC[1]).encode())
    examples, _, _ = read_examples(path)
    assert [e.answer for e in examples] == ["4", "Paris"] and examples[1].source.endswith("bom.jsonl:4")


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("lines, where, message", [
    (['{"prompt": "a", "answer": "1"}', '{"prompt": "b", "answer": '], "2: row", "not valid JSON"),
    (['[1, 2]'], "1: row", "expected a JSON object, got an array"),
    (['{"prompt": "a", "answer": "1"}', '{"prompt": "b"}'], "2: answer", "missing"),
    (['{"prompt": "a", "answer": "1"}', '{"prompt": "  ", "answer": "2"}'], "2: prompt", "empty"),
    (['{"prompt": "a", "answer": true}'], "1: answer", "expected a string or a number, got a boolean"),
    (['{"prompt": "a", "answer": [1]}'], "1: answer", "got an array"),
    (['{"prompt": ["a"], "answer": "1"}'], "1: prompt", "expected a string, got an array"),
    (['{"prompt": "a", "answer": "1", "solution": 3}'], "1: solution", "expected a string, got a number"),
    (['{"prompt": "a", "answer": "1", "subset": {}}'], "1: subset", "got an object"),
    (['{"question": "q", "answer": "no final line"}'], "1: answer", "no final answer after '#### '"),
    (['{"question": "q", "answer": "x\\n#### "}'], "1: answer", "empty final answer after '####'"),
    (['{"problem": "p", "solution": "no box"}'], "1: solution", "no \\boxed{...} answer and no 'answer' field"),
    (['{"problem": "p", "solution": "\\\\boxed{\\\\frac{1}{2}"}'], "1: solution", "no \\boxed{...} answer"),
    (['{"messages": "hi", "answer": "1"}'], "1: messages", "expected an array of {role, content} objects, got a string"),
    (['{"messages": [], "answer": "1"}'], "1: messages", "empty"),
    (['{"messages": [{"role": "bot", "content": "x"}], "answer": "1"}'], "1: messages", "message 1: role 'bot' is not"),
    (['{"messages": [{"role": "user", "content": 5}], "answer": "1"}'], "1: messages", "message 1: content: expected a string"),
    (['{"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}], "answer": "1"}'],
     "1: messages", "must end with a user message"),
    (['{"messages": [["user", "hi"]], "answer": "1"}'], "1: messages", "message 1: expected an object"),
    (['{"messages": [{"role": "user", "content": "hi"}]}'], "1: answer", "missing"),
])
def test_malformed_rows_are_one_line_naming_file_line_and_field(tmp_path, lines, where, message):
    path = write_rows(tmp_path / "bad.jsonl", None, lines)
    error = read_error(path)
    assert error.startswith(f"data: {path}:{where}: ") and message in error, error


def test_file_level_errors(tmp_path):
    assert read_error(tmp_path / "nope.jsonl") == f"data: {tmp_path / 'nope.jsonl'}: no such file or directory"
    empty = write_rows(tmp_path / "empty.jsonl", None, ["", "  "])
    assert read_error(empty) == f"data: {empty}: no rows"
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(json.dumps(GENERIC[0]).encode() + b"\n" + '{"prompt": "café", "answer": "1"}'.encode("latin-1"))
    assert read_error(latin).startswith(f"data: {latin}:2: row: not UTF-8 text")
    fake = tmp_path / "fake.parquet"
    fake.write_text("not parquet")
    assert read_error(fake).startswith(f"data: {fake}: not a readable Parquet file")
    csv = tmp_path / "rows.csv"
    csv.write_text("a,b\n")
    assert "expected a .jsonl or .parquet file" in read_error(csv)
    (tmp_path / "nothing").mkdir()
    assert read_error(tmp_path / "nothing") == f"data: {tmp_path / 'nothing'}: a directory with no .jsonl or .parquet files"
    unknown = write_rows(tmp_path / "unknown.jsonl", [{"text": "hello"}])
    assert read_error(unknown).startswith(f"data: {unknown}:1: cannot tell the shape from the fields (text)")
    assert "unknown format 'csv'" in read_error(unknown, format="csv")
    assert "field override 'solution' does not apply to gsm8k rows" in read_error(
        write_rows(tmp_path / "g.jsonl", GSM8K), fields={"solution": "steps"})


def test_parquet_errors_name_the_row(tmp_path):
    path = write_parquet(tmp_path / "rows.parquet", [{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": None}])
    assert read_error(path) == f"data: {path}:2: answer: expected a string or a number, got null"


def test_skip_bad_rows_counts_them_and_an_all_bad_file_still_fails(tmp_path):
    lines = [json.dumps(GENERIC[0]), '{"prompt": "b"}', "{oops", json.dumps(GENERIC[1]), '"just a string"']
    path = write_rows(tmp_path / "mixed.jsonl", None, lines)
    examples, shape, skipped = read_examples(path, skip_bad_rows=True)
    assert shape == "generic" and [e.answer for e in examples] == ["4", "Paris"]
    assert [s.removeprefix(f"{path}:") for s in skipped] == [
        "2: answer: missing", "3: row: not valid JSON (Expecting property name enclosed in double quotes at column 2)",
        "5: row: expected a JSON object, got a string"]
    prompts = load_prompt_set(path, skip_bad_rows=True, heldout_percent=50)
    assert prompts.skipped == 3 and prompts.skipped_reasons == skipped and prompts.files == [str(path)]
    all_bad = write_rows(tmp_path / "bad.jsonl", None, ['{"prompt": "a"}', "[]"])
    message = read_error(all_bad, format="generic", skip_bad_rows=True)
    assert message.startswith(f"data: {all_bad}: every row is malformed (2 rows; the first: {all_bad}:1: answer: missing")


def test_tasks_export_bad_arguments_exit_2_in_one_line(tmp_path, capsys):
    out = tmp_path / "t.jsonl"
    for argv, message in [(["--tiers", "1,7"], "--tiers must be comma-separated tiers in 0..3, got '1,7'"),
                          (["--tiers", "a"], "--tiers must be"), (["--n", "0"], "--n must be >= 1, got 0"),
                          (["--n", "x"], "invalid int value")]:
        assert main(["tasks", "export", "--out", str(out), *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    assert not out.exists()
    out.write_text("mine\n")
    assert main(["tasks", "export", "--out", str(out), "--n", "3"]) == 2
    assert f"{out} exists (pass --overwrite to replace it)" in capsys.readouterr().err
    assert out.read_text() == "mine\n"


# ---------------------------------------------------------------- the split, writing, the embedded tiers


def test_split_is_stable_order_free_and_never_one_sided():
    examples = [example_from_problem(p) for p in generate_problems(200, (0, 1, 2), seed=3, split="train")]
    train, heldout = split_heldout(examples, 10)
    assert (train, heldout) == split_heldout(list(examples), 10)
    assert 5 <= len(heldout) <= 40 and len(train) + len(heldout) == 200
    reordered_train, reordered_heldout = split_heldout(examples[::-1], 10)
    assert set(reordered_train) == set(train) and set(reordered_heldout) == set(heldout)
    assert reordered_heldout == heldout[::-1]  # each side keeps the input order
    for n in range(2, 6):  # tiny sets: at least one example on each side, whatever the hashes
        for percent in (1, 99):
            train, heldout = split_heldout(examples[:n], percent)
            assert train and heldout and len(train) + len(heldout) == n
    assert sum(map(len, split_heldout(examples[:1], 50))) == 1
    with pytest.raises(ValueError):
        split_heldout(examples, 0)


def test_load_prompt_set_with_an_eval_file(tmp_path):
    train = write_rows(tmp_path / "train.jsonl", GSM8K)
    test = write_parquet(tmp_path / "test.parquet", GSM8K[:1])
    prompts = load_prompt_set(train, eval_path=test)
    assert prompts.format == "gsm8k" and prompts.files == [str(train), str(test)]
    assert [e.answer for e in prompts.train] == ["1200", "42"] and [e.answer for e in prompts.heldout] == ["1200"]


@pytest.mark.parametrize("rows", [GENERIC, CHAT, MATH])
def test_write_jsonl_round_trip(tmp_path, rows):
    examples, _, _ = read_examples(write_rows(tmp_path / "in.jsonl", rows))
    write_jsonl(examples, tmp_path / "out" / "back.jsonl")
    assert read_examples(tmp_path / "out" / "back.jsonl")[0] == examples
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["back.jsonl"]


def test_embedded_prompt_set_and_its_round_trip(tmp_path):
    prompts = embedded_prompt_set([1, 2], seed=0, n_train=50, n_heldout=4)
    assert prompts.format == "embedded" and len(prompts.train) == 50 and len(prompts.heldout) == 8
    assert [e.subset for e in prompts.heldout] == ["medium"] * 4 + ["hard"] * 4
    first = generate_problems(1, [1, 2], 0, "train")[0]
    assert prompts.train[0] == Example((("user", first.prompt),), first.answer, first.solution, "medium")
    write_jsonl(prompts.train, tmp_path / "train.jsonl")
    examples, shape, _ = read_examples(tmp_path / "train.jsonl")
    assert shape == "generic" and examples == prompts.train


def test_tasks_export_defaults_are_linglab_rl_defaults(tmp_path, capsys):
    rl = RLConfig()
    train, heldout = tmp_path / "train.jsonl", tmp_path / "heldout.jsonl"
    assert main(["tasks", "export", "--out", str(train)]) == 0
    assert f"wrote {rl.train_problems} train problems" in capsys.readouterr().out
    assert main(["tasks", "export", "--out", str(heldout), "--split", "heldout"]) == 0
    default = embedded_prompt_set(rl.tiers, rl.seed, rl.train_problems, rl.eval_problems)
    assert read_examples(train)[0] == default.train
    assert read_examples(heldout)[0] == embedded_prompt_set(EVAL_TIERS, rl.seed, 0, rl.eval_problems).heldout
    assert main(["tasks", "export", "--out", str(train), "--tiers", "0,2", "--n", "5", "--seed", "7", "--overwrite"]) == 0
    assert read_examples(train)[0] == embedded_prompt_set([0, 2], 7, 5, 0).train
