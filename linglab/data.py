"""Training data: user text files, documents packed into fixed-length rows, and a resumable loader.

A document is `tokens(prompt) + tokens(solution) + [eos]` (task corpus) or `tokens(text) + [eos]`
(user data). Each token carries a loss-mask bit: 0 on prompt tokens, 1 on solution tokens and the
EOS, so the model is trained to solve, not to pose, problems (`loss_on_prompt=True` trains on
everything; user text is always trained on everything). Prompt and solution are encoded separately,
exactly as the prompt is encoded alone when sampling.

Packing: all documents are laid back to back in one stream, which is cut into rows of `seq_len + 1`
tokens starting every `seq_len` tokens, so each row's last token is the next row's first and every
adjacent pair of tokens is trained exactly once. Documents are split across rows where a row ends
(standard packing); the leftover tail shorter than a row is dropped.

    dataset = PackedDataset.from_pairs(pairs, tokenizer, seq_len=128)
    loader = DataLoader(dataset, batch_size=32, seed=0)
    inputs, targets, loss_mask = loader.next_batch()
    state = loader.state_dict()            # save with the checkpoint; load_state_dict to resume
    mine = loader.next_batch(shard=rank, num_shards=world)   # under torchrun: this rank's rows of the batch

User files (`load_text_documents`): `.txt` holds one document per block of lines separated by blank
lines, `.jsonl` one JSON object with a string `text` field per line, `.parquet` a string `text`
column; a directory means all such files directly inside it, in sorted order. A file that cannot be read (not
UTF-8, bad JSON, a corrupted parquet page) is a one-line error naming it. Plain texts are tokenised a bounded batch
of pieces at a time (`text_token_stream`), so one huge single-line document does not take GBs.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from linglab.corpora import load_corpus
from linglab.errors import LinglabError
from linglab.tasks import format_document, generate_problems, heldout_problems
from linglab.tokenizer import Tokenizer, load_tokenizer, text_chunks

SUFFIXES = (".txt", ".jsonl", ".parquet")
_BLANK_LINES = re.compile(r"\n[ \t]*\n")


# ---------------------------------------------------------------- user files


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise LinglabError(f"{path}: not UTF-8 text (byte {error.start})") from None


def _txt_documents(path: Path) -> list[str]:
    text = _read_utf8(path).replace("\r\n", "\n")
    # Strip only newlines so indentation at the start of a block survives.
    return [block.strip("\n") for block in _BLANK_LINES.split(text) if block.strip()]


def _jsonl_documents(path: Path) -> list[str]:
    documents = []
    for number, line in enumerate(_read_utf8(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise LinglabError(f"{path}: line {number}: invalid JSON ({error.msg})") from None
        if not isinstance(record, dict) or "text" not in record:
            raise LinglabError(f"{path}: line {number}: no 'text' field")
        if not isinstance(record["text"], str):
            raise LinglabError(f"{path}: line {number}: 'text' is not a string")
        if record["text"].strip():
            documents.append(record["text"])
    return documents


def _parquet_documents(path: Path) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as error:
        raise LinglabError(f"{path}: not a readable parquet file ({str(error).splitlines()[0]})") from None
    if "text" not in schema.names:
        raise LinglabError(f"{path}: no 'text' column (columns: {', '.join(schema.names)})")
    if not (pa.types.is_string(schema.field("text").type) or pa.types.is_large_string(schema.field("text").type)):
        raise LinglabError(f"{path}: 'text' column is {schema.field('text').type}, not string")
    try:
        # Page checksums catch a corrupted page in files written with them; other corruption surfaces while decoding.
        table = pq.read_table(path, columns=["text"], page_checksum_verification=True)
        texts = table.column("text").to_pylist()
    except (pa.ArrowException, OSError, UnicodeDecodeError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise LinglabError(f"{path}: corrupted parquet data ({reason})") from None
    return [text for text in texts if text is not None and text.strip()]


_READERS = {".txt": _txt_documents, ".jsonl": _jsonl_documents, ".parquet": _parquet_documents}


def _file_documents(path: Path) -> list[str]:
    if path.suffix not in _READERS:
        raise LinglabError(f"{path}: unsupported file type (expected {', '.join(SUFFIXES)})")
    if path.stat().st_size == 0:
        raise LinglabError(f"{path}: file is empty")
    documents = _READERS[path.suffix](path)
    if not documents:
        raise LinglabError(f"{path}: contains no documents")
    return documents


def load_text_documents(path: str | Path) -> list[str]:
    """The documents in a `.txt`/`.jsonl`/`.parquet` file, or in all such files of a directory."""
    path = Path(path)
    if not path.exists():
        raise LinglabError(f"{path}: no such file or directory")
    if not path.is_dir():
        return _file_documents(path)
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in SUFFIXES)
    if not files:
        raise LinglabError(f"{path}: directory has no {', '.join(SUFFIXES)} files")
    return [document for file in files for document in _file_documents(file)]


# ---------------------------------------------------------------- packing


def _stream(pieces: list[list[int]], bits: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate token pieces into one stream; every token of `pieces[i]` gets loss-mask bit `bits[i]`."""
    lengths = np.fromiter((len(piece) for piece in pieces), dtype=np.int64, count=len(pieces))
    tokens = np.fromiter(itertools.chain.from_iterable(pieces), dtype=np.int32, count=int(lengths.sum()))
    return tokens, np.repeat(np.array(bits, dtype=np.bool_), lengths)


ENCODE_BATCH_CHARS = 1 << 20  # characters handed to the tokenizer per call by `text_token_stream`


def text_token_stream(texts: Sequence[str], tokenizer: Tokenizer,
                      batch_chars: int = ENCODE_BATCH_CHARS) -> np.ndarray:
    """tokens(text) + [eos] for every text, as one int32 stream.

    Memory stays ~4 bytes a token plus one batch: texts are encoded in pieces (`text_chunks`, which change no token)
    about `batch_chars` characters at a time, each batch turned into an array at once. Encoding a whole user file in
    one call held the library's encoding (~100 bytes a token) and Python lists of every id together.
    """
    eos, parts, pieces, ends, size = [tokenizer.eos_id], [], [], [], 0

    def encode() -> None:
        ids = tokenizer.encode_batch(pieces)
        stream = itertools.chain.from_iterable(x + eos if end else x for x, end in zip(ids, ends, strict=True))
        parts.append(np.fromiter(stream, dtype=np.int32))
        pieces.clear()
        ends.clear()

    for text in texts:
        chunks = list(text_chunks(text))
        for i, chunk in enumerate(chunks):
            pieces.append(chunk)
            ends.append(i == len(chunks) - 1)
            size += len(chunk)
            if size >= batch_chars:
                encode()
                size = 0
    if pieces:
        encode()
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


class PackedDataset:
    """Documents packed into rows: `tokens` and per-token `loss_mask`, both `[num_rows, seq_len + 1]`.

    `loss_mask[r, j]` says whether token j of row r is trained as a target (it matters for j >= 1).
    """

    def __init__(self, tokens: torch.Tensor, loss_mask: torch.Tensor) -> None:
        if tokens.shape != loss_mask.shape or tokens.dim() != 2:
            raise ValueError(f"tokens {tuple(tokens.shape)} and loss_mask {tuple(loss_mask.shape)} "
                             "must have the same 2-D shape")
        self.tokens = tokens
        self.loss_mask = loss_mask

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1] - 1

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @classmethod
    def from_stream(cls, tokens: np.ndarray, loss_mask: np.ndarray, seq_len: int,
                    doc_starts: np.ndarray | None = None) -> PackedDataset:
        """Cut a flat token stream into rows of `seq_len + 1` tokens that start every `seq_len` tokens.

        With `doc_starts` (True at each document's first token), the loss is masked on a row's leading
        fragment of a document that began in the previous row: its prompt is out of view, so its
        answer digits cannot be predicted and would only add noise (~1/4 of the targets otherwise).
        """
        num_rows = (len(tokens) - 1) // seq_len
        if num_rows < 1:
            raise LinglabError(f"data has only {len(tokens)} tokens; need at least seq_len + 1 = {seq_len + 1}")
        # Overlapping rows by one token is a strided view of the stream; copy it out once.
        rows = np.lib.stride_tricks.sliding_window_view(tokens, seq_len + 1)[::seq_len][:num_rows]
        mask_rows = np.lib.stride_tricks.sliding_window_view(loss_mask, seq_len + 1)[::seq_len][:num_rows].copy()
        if doc_starts is not None:
            start_rows = np.lib.stride_tricks.sliding_window_view(doc_starts, seq_len + 1)[::seq_len][:num_rows]
            first_start = np.where(start_rows.any(axis=1), start_rows.argmax(axis=1), seq_len + 1)
            mask_rows &= np.arange(seq_len + 1)[None, :] >= first_start[:, None]
        return cls(torch.from_numpy(rows.copy()), torch.from_numpy(mask_rows))

    @classmethod
    def from_pairs(cls, pairs: Sequence[tuple[str, str]], tokenizer: Tokenizer, seq_len: int,
                   loss_on_prompt: bool = False) -> PackedDataset:
        """Pack (prompt, solution) documents; the loss covers the solution and EOS (and the prompt if asked)."""
        encoded = tokenizer.encode_batch([text for pair in pairs for text in pair])
        eos = [tokenizer.eos_id]
        pieces = [piece for i in range(0, len(encoded), 2) for piece in (encoded[i], encoded[i + 1], eos)]
        tokens, mask = _stream(pieces, [int(loss_on_prompt), 1, 1] * len(pairs))
        _, starts = _stream(pieces, [1, 0, 0] * len(pairs))
        first_of_prompt = starts & np.concatenate([[True], ~starts[:-1]])  # first token of each prompt
        return cls.from_stream(tokens, mask, seq_len, doc_starts=first_of_prompt)

    @classmethod
    def from_conversations(cls, conversations: Sequence[Sequence[tuple[str, bool]]], tokenizer: Tokenizer,
                           seq_len: int) -> PackedDataset:
        """Pack rendered conversations (`chat.render_conversation`: (text, is_assistant) pieces whose texts end each
        turn as the chat template does, EOS included); the loss covers the assistant pieces only (SFT)."""
        flat = [piece for conversation in conversations for piece in conversation]
        encoded = tokenizer.encode_batch([text for text, _ in flat])
        tokens, mask = _stream(encoded, [int(is_assistant) for _, is_assistant in flat])
        firsts = [int(i == 0) for conversation in conversations for i in range(len(conversation))]
        _, starts = _stream(encoded, firsts)
        first_of_conversation = starts & np.concatenate([[True], ~starts[:-1]])
        return cls.from_stream(tokens, mask, seq_len, doc_starts=first_of_conversation)

    @classmethod
    def from_texts(cls, texts: Sequence[str], tokenizer: Tokenizer, seq_len: int) -> PackedDataset:
        """Pack plain-text documents, each followed by EOS, with the loss on every token."""
        tokens = text_token_stream(texts, tokenizer)
        return cls.from_stream(tokens, np.ones(len(tokens), dtype=np.bool_), seq_len)


# ---------------------------------------------------------------- loading


class DataLoader:
    """Endless shuffled batches of rows, deterministic in `seed` and resumable from `state_dict()`.

    Epoch e visits the rows in a permutation drawn from a generator seeded by (seed, e); a final
    partial batch is skipped so every batch has `batch_size` rows.
    """

    def __init__(self, dataset: PackedDataset, batch_size: int, seed: int) -> None:
        if len(dataset) < batch_size:
            raise LinglabError(f"dataset has {len(dataset)} rows, fewer than batch_size={batch_size}; "
                               "add data or lower the batch size")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.position = 0  # index into this epoch's permutation of the next batch's first row
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        # SeedSequence mixes (seed, epoch) so neighbouring seeds and epochs give unrelated orders.
        mixed = int(np.random.SeedSequence([self.seed, epoch]).generate_state(1, dtype=np.uint64)[0] >> 1)
        generator = torch.Generator().manual_seed(mixed)
        return torch.randperm(len(self.dataset), generator=generator)

    def next_batch(self, shard: int = 0, num_shards: int = 1,
                   micro_batches: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(inputs, targets, loss_mask), each `[batch_size / num_shards, seq_len]`: int64, int64, float32.

        With `num_shards` ranks, each reads the rows of shard `shard` only: the global batch is cut into
        `micro_batches` consecutive micro-batches and each of those into `num_shards` equal parts, so
        chunking the result into `micro_batches` gives this rank's part of every single-process micro-batch.
        The position advances by the global batch on every rank, so the loader's state is the same on all.
        """
        if self.batch_size % (micro_batches * num_shards):
            raise LinglabError(f"batch_size {self.batch_size} does not split into {micro_batches} micro-batch(es) "
                               f"x {num_shards} rank(s)")
        if self.position + self.batch_size > len(self.dataset):
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        rows = self._order[self.position:self.position + self.batch_size]
        rows = rows.view(micro_batches, num_shards, -1)[:, shard].flatten()
        self.position += self.batch_size
        tokens = self.dataset.tokens[rows].long()
        return tokens[:, :-1], tokens[:, 1:], self.dataset.loss_mask[rows, 1:].float()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self.epoch)


# ---------------------------------------------------------------- a run's data


@dataclass
class RunData:
    """What a pretraining run (or `linglab eval`) reads: the tokenizer, packed train rows and the held-out sets."""

    tokenizer: Tokenizer
    train: PackedDataset | None
    heldout: PackedDataset | None  # every held-out tier packed together: the run's held-out loss
    heldout_problems: dict[int, list] = field(default_factory=dict)  # tier -> problems (embedded corpus)
    heldout_by_tier: dict[int, PackedDataset] = field(default_factory=dict)  # tier -> its problems packed alone
    corpus: dict | None = None  # a named corpus's info (linglab.corpora: name, files, bytes, sha256)


def heldout_data(tokenizer: Tokenizer, problems: dict[int, list], seq_len: int) -> RunData:
    """Held-out problems per tier packed for loss (all together, and each tier alone), without training rows."""
    pairs = [format_document(p) for tier in problems for p in problems[tier]]
    heldout = PackedDataset.from_pairs(pairs, tokenizer, seq_len) if pairs else None
    by_tier = {}
    for tier, ps in problems.items():
        try:
            by_tier[tier] = PackedDataset.from_pairs([format_document(p) for p in ps], tokenizer, seq_len)
        except LinglabError:  # too few problems to fill one row alone: that tier's loss is only in the joint one
            continue
    return RunData(tokenizer, None, heldout, problems, by_tier)


def build_data(cfg, run_dir: Path, eval_problems: int, save_tokenizer: bool = True, reuse_saved: bool = True) -> RunData:
    """Corpus (`data.corpus`: a named real-text corpus with its held-out files, the first `data.heldout_tokens` of
    them scored; `data.path`: user text; else the embedded arithmetic), tokenizer (data.tokenizer, else the run dir's
    tokenizer.json when `reuse_saved`, else trained; saved there when `save_tokenizer`) and packed datasets of the
    `[data]` section `cfg`.

    `save_tokenizer=False` leaves the run dir alone: a job validating its inputs before it writes, or ranks other
    than 0, which reuse the tokenizer rank 0 saved.
    """
    problems, corpus = {}, None
    if cfg.corpus:
        corpus = load_corpus(cfg.corpus)
        texts, pairs = corpus.train, None
    elif cfg.path:
        texts = load_text_documents(cfg.path)
        pairs = None
    else:
        pairs = [format_document(p) for p in generate_problems(cfg.num_documents, tiers=cfg.tiers, seed=cfg.seed,
                                                               split="train")]
        texts = [prompt + solution for prompt, solution in pairs]
        problems = heldout_problems(eval_problems, cfg.tiers, cfg.seed)

    saved = run_dir / "tokenizer.json"
    if cfg.tokenizer:
        tokenizer = load_tokenizer(cfg.tokenizer)
    elif reuse_saved and saved.is_file():
        tokenizer = load_tokenizer(saved)
    else:
        tokenizer = Tokenizer.train(texts[:20000], vocab_size=cfg.vocab_size)
    if save_tokenizer:
        tokenizer.save(saved)

    if corpus is not None:
        heldout = PackedDataset.from_texts(corpus.heldout, tokenizer, cfg.seq_len)
        rows = max(1, cfg.heldout_tokens // cfg.seq_len)
        heldout = PackedDataset(heldout.tokens[:rows], heldout.loss_mask[:rows])
        return RunData(tokenizer, PackedDataset.from_texts(texts, tokenizer, cfg.seq_len), heldout, corpus=corpus.info)
    if pairs is None:
        return RunData(tokenizer, PackedDataset.from_texts(texts, tokenizer, cfg.seq_len), None)
    data = heldout_data(tokenizer, problems, cfg.seq_len)
    data.train = PackedDataset.from_pairs(pairs, tokenizer, cfg.seq_len, loss_on_prompt=cfg.loss_on_prompt)
    return data
