"""Data: packing layout and loss mask, loader determinism and resume, user file loading and errors."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from linglab.data import DataLoader, PackedDataset, load_text_documents
from linglab.errors import LinglabError
from linglab.tasks import format_document, generate_problems, iter_corpus_texts
from linglab.tokenizer import Tokenizer

SEQ_LEN = 32


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(iter_corpus_texts(1000, seed=0), vocab_size=400)


@pytest.fixture(scope="module")
def pairs() -> list[tuple[str, str]]:
    return [format_document(p) for p in generate_problems(200, (0, 1, 2), seed=0, split="train")]


def expected_stream(pairs, tokenizer, loss_on_prompt=False):
    tokens, mask = [], []
    for prompt, solution in pairs:
        p, s = tokenizer.encode(prompt), tokenizer.encode(solution)
        tokens += p + s + [tokenizer.eos_id]
        mask += [int(loss_on_prompt)] * len(p) + [1] * (len(s) + 1)
    return tokens, mask


def _prompt_starts(pairs, tokenizer) -> list[int]:
    starts, pos = [], 0
    for prompt, solution in pairs:
        starts.append(pos)
        pos += len(tokenizer.encode(prompt)) + len(tokenizer.encode(solution)) + 1
    return starts


def test_packing_layout(pairs, tokenizer) -> None:
    dataset = PackedDataset.from_pairs(pairs, tokenizer, SEQ_LEN)
    tokens, mask = expected_stream(pairs, tokenizer)
    starts = _prompt_starts(pairs, tokenizer)
    assert dataset.seq_len == SEQ_LEN and len(dataset) == (len(tokens) - 1) // SEQ_LEN
    assert dataset.tokens.shape == dataset.loss_mask.shape == (len(dataset), SEQ_LEN + 1)
    for r in range(len(dataset)):
        lo = r * SEQ_LEN
        window = slice(lo, lo + SEQ_LEN + 1)
        assert dataset.tokens[r].tolist() == tokens[window]
        # The loss is off on the leading fragment of a document whose prompt began in an earlier row.
        first = min([s - lo for s in starts if lo <= s <= lo + SEQ_LEN], default=SEQ_LEN + 1)
        expected = [m if j >= first else 0 for j, m in enumerate(mask[window])]
        assert dataset.loss_mask[r].int().tolist() == expected
    # Rows overlap by one token, so every adjacent pair is seen exactly once.
    assert torch.equal(dataset.tokens[1:, 0], dataset.tokens[:-1, -1])


def test_mask_is_zero_exactly_on_prompts(pairs, tokenizer) -> None:
    dataset = PackedDataset.from_pairs(pairs, tokenizer, SEQ_LEN)
    prompt, solution = pairs[0]
    n_prompt, n_solution = len(tokenizer.encode(prompt)), len(tokenizer.encode(solution))
    expected = ([0] * n_prompt + [1] * (n_solution + 1))[:SEQ_LEN + 1]
    assert dataset.loss_mask[0, :len(expected)].int().tolist() == expected
    everywhere = PackedDataset.from_pairs(pairs, tokenizer, SEQ_LEN, loss_on_prompt=True)
    assert everywhere.loss_mask[0].all()


def test_plain_texts_train_on_everything(tokenizer) -> None:
    texts = ["hello world " * 5, "second document\nwith two lines"]
    dataset = PackedDataset.from_texts(texts, tokenizer, seq_len=8)
    stream = tokenizer.encode(texts[0]) + [tokenizer.eos_id] + tokenizer.encode(texts[1]) + [tokenizer.eos_id]
    assert dataset.tokens[0].tolist() == stream[:9]
    assert bool(dataset.loss_mask.all())


def test_too_little_data(tokenizer) -> None:
    with pytest.raises(LinglabError, match="seq_len"):
        PackedDataset.from_texts(["hi"], tokenizer, seq_len=64)


def test_batches(pairs, tokenizer) -> None:
    dataset = PackedDataset.from_pairs(pairs, tokenizer, SEQ_LEN)
    inputs, targets, mask = DataLoader(dataset, batch_size=4, seed=0).next_batch()
    assert inputs.shape == targets.shape == mask.shape == (4, SEQ_LEN)
    assert (inputs.dtype, targets.dtype, mask.dtype) == (torch.int64, torch.int64, torch.float32)
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    rows = [r for r in range(len(dataset)) if torch.equal(dataset.tokens[r, :-1], inputs[0])]
    assert rows and torch.equal(mask[0], dataset.loss_mask[rows[0], 1:].float())


def collect(loader: DataLoader, n: int) -> list[torch.Tensor]:
    return [loader.next_batch()[0] for _ in range(n)]


def test_loader_is_deterministic_and_shuffles_each_epoch(pairs, tokenizer) -> None:
    dataset = PackedDataset.from_pairs(pairs, tokenizer, SEQ_LEN)
    per_epoch = len(dataset) // 8
    first = collect(DataLoader(dataset, 8, seed=3), 2 * per_epoch)
    second = collect(DataLoader(dataset, 8, seed=3), 2 * per_epoch)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert not torch.equal(first[0], collect(DataLoader(dataset, 8, seed=4), 1)[0])
    epoch0, epoch1 = torch.cat(first[:per_epoch]), torch.cat(first[per_epoch:])
    assert len({tuple(row.tolist()) for row in epoch0}) == per_epoch * 8  # no row twice in an epoch
    assert not torch.equal(epoch0, epoch1)


@pytest.mark.parametrize("consumed", [3, "epoch_end", "past_epoch"])
def test_loader_resumes(pairs, tokenizer, consumed) -> None:
    dataset = PackedDataset.from_pairs(pairs, tokenizer, SEQ_LEN)
    per_epoch = len(dataset) // 8
    steps = {"epoch_end": per_epoch, "past_epoch": per_epoch + 2}.get(consumed, consumed)
    loader = DataLoader(dataset, 8, seed=1)
    collect(loader, steps)
    state = loader.state_dict()
    assert set(state) == {"epoch", "position"}
    resumed = DataLoader(dataset, 8, seed=1)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # states survive a checkpoint round trip
    expected, got = collect(loader, per_epoch + 3), collect(resumed, per_epoch + 3)
    assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))


def test_ranks_read_their_part_of_every_micro_batch() -> None:
    """Under torchrun each rank reads its shard; together they are the single-process batch, micro-batch by micro-batch."""
    dataset = PackedDataset(torch.arange(12 * 5).view(12, 5), torch.ones(12, 5, dtype=torch.bool))
    whole = DataLoader(dataset, batch_size=8, seed=0)
    ranks = [DataLoader(dataset, batch_size=8, seed=0) for _ in range(2)]
    for _ in range(3):  # 12 rows hold one batch of 8: every step starts an epoch
        full = whole.next_batch(micro_batches=2)[0]
        parts = [loader.next_batch(shard=r, num_shards=2, micro_batches=2)[0] for r, loader in enumerate(ranks)]
        assert all(p.shape == (4, 4) for p in parts)
        for m in range(2):
            assert torch.equal(torch.cat([p.chunk(2)[m] for p in parts]), full.chunk(2)[m])
        assert all(loader.state_dict() == whole.state_dict() for loader in ranks)
    with pytest.raises(LinglabError, match="does not split into 1 micro-batch"):
        whole.next_batch(num_shards=3)


def test_batch_larger_than_dataset(pairs, tokenizer) -> None:
    dataset = PackedDataset.from_pairs(pairs[:20], tokenizer, SEQ_LEN)
    with pytest.raises(LinglabError, match="batch_size"):
        DataLoader(dataset, batch_size=len(dataset) + 1, seed=0)


# ---------------------------------------------------------------- user files


def test_txt_blocks(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("first line\n  indented second\n\n \n\nnext block\r\n\r\nlast\n")
    assert load_text_documents(path) == ["first line\n  indented second", "next block", "last"]


def test_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "one", "id": 1}) + "\n\n" + json.dumps({"text": "two\nlines"}) + "\n")
    assert load_text_documents(path) == ["one", "two\nlines"]


def test_parquet(tmp_path: Path) -> None:
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": ["alpha", None, "beta"], "n": [1, 2, 3]}), path)
    assert load_text_documents(path) == ["alpha", "beta"]


def test_directory_in_sorted_order(tmp_path: Path) -> None:
    (tmp_path / "b.jsonl").write_text('{"text": "from b"}\n')
    (tmp_path / "a.txt").write_text("from a\n\nalso a")
    (tmp_path / "ignored.md").write_text("not data")
    pq.write_table(pa.table({"text": ["from c"]}), tmp_path / "c.parquet")
    assert load_text_documents(tmp_path) == ["from a", "also a", "from b", "from c"]


def write_bad(tmp_path: Path, name: str, content: str | bytes | None) -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    return path


@pytest.mark.parametrize(("name", "content", "problem"), [
    ("missing.txt", None, "no such file"),
    ("empty.txt", "", "empty"),
    ("blank.txt", "\n \n\n", "no documents"),
    ("blank.jsonl", '{"text": "  "}\n', "no documents"),
    ("binary.txt", b"\xff\xfe\x00bad", "UTF-8"),
    ("broken.jsonl", '{"text": "ok"}\n{"text": oops}\n', "line 2: invalid JSON"),
    ("nofield.jsonl", '{"text": "ok"}\n{"body": "x"}\n', "line 2: no 'text' field"),
    ("list.jsonl", '["text"]\n', "line 1: no 'text' field"),
    ("number.jsonl", '{"text": 5}\n', "line 1: 'text' is not a string"),
    ("broken.parquet", b"definitely not parquet", "not a readable parquet"),
    ("data.csv", "text\nhello\n", "unsupported file type"),
])
def test_bad_user_files(tmp_path: Path, name: str, content, problem: str) -> None:
    path = write_bad(tmp_path, name, content)
    with pytest.raises(LinglabError, match=problem) as error:
        load_text_documents(path)
    assert name in str(error.value) and "\n" not in str(error.value)


def test_bad_parquet_columns(tmp_path: Path) -> None:
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "nocol.parquet")
    with pytest.raises(LinglabError, match="nocol.parquet: no 'text' column"):
        load_text_documents(tmp_path / "nocol.parquet")
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    with pytest.raises(LinglabError, match="ints.parquet: 'text' column is int64"):
        load_text_documents(tmp_path / "ints.parquet")


def test_directory_without_data(tmp_path: Path) -> None:
    (tmp_path / "readme.md").write_text("nothing here")
    with pytest.raises(LinglabError, match=f"{tmp_path.name}: directory has no"):
        load_text_documents(tmp_path)
