"""A tiny byte-level BPE tokenizer in which every digit is its own token.

A thin wrapper around the Hugging Face `tokenizers` library. Digits are split off before BPE runs, so
no merge ever spans two digits: column arithmetic stays one token per digit. Byte-level encoding
means any text round-trips exactly through `encode`/`decode`. Two special tokens: `<|eos|>` ends
every document and `<|pad|>` fills unused positions.

    tok = Tokenizer.train(iter_corpus_texts(20_000, seed=0), vocab_size=512)
    tok.save("run/tokenizer.json")
    tok = load_tokenizer("run")           # a directory means <dir>/tokenizer.json
    ids = tok.encode("47+58=?\\n")
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from linglab.errors import LinglabError

EOS = "<|eos|>"
PAD = "<|pad|>"
FILE_NAME = "tokenizer.json"
_BYTE_ALPHABET = 256
CHUNK_CHARS = 1 << 16  # the longest piece of one text the library sees at once (`text_chunks`)
# One space or newline between two non-space characters: both pre-tokenizers (digits apart, then GPT-2's regex) start
# a new pre-token at it, so a text cut just before it encodes to the same tokens as the whole.
_CUT = re.compile(r"(?<=\S)[ \n](?=\S)")


def text_chunks(text: str, max_chars: int = CHUNK_CHARS) -> Iterator[str]:
    """`text` in pieces of at most `max_chars` characters whose encodings, concatenated, are the encoding of `text`.

    Why: the library holds a text's whole encoding (ids, offsets, token strings: ~100 bytes a token) and its
    pre-tokens at once, so one 8 MB single-line document took GBs to train on or encode. Each piece ends just before
    the last `_CUT` within the limit; a stretch of `max_chars` with none (a long run without single spaces) is cut at
    the limit, where only the tokens across the cut can differ.
    """
    start = 0
    while len(text) - start > max_chars:
        cut = start + max_chars
        # endpos one past the last allowed cut, so the lookahead sees the character after it
        for m in _CUT.finditer(text, start + 1, start + max_chars + 2):
            cut = m.start()
        yield text[start:cut]
        start = cut
    yield text[start:]


def _tokenizer_file(path: str | Path) -> Path:
    """A `.json` path is the file itself; anything else is a directory holding `tokenizer.json`."""
    path = Path(path)
    return path if path.suffix == ".json" else path / FILE_NAME


class Tokenizer:
    """Byte-level BPE with single-digit tokens and the `<|eos|>` / `<|pad|>` special tokens."""

    def __init__(self, hf_tokenizer: tokenizers.Tokenizer) -> None:
        self.hf_tokenizer = hf_tokenizer
        eos_id, pad_id = hf_tokenizer.token_to_id(EOS), hf_tokenizer.token_to_id(PAD)
        if eos_id is None or pad_id is None:
            raise LinglabError(f"tokenizer has no {EOS} or {PAD} token")
        self.eos_id: int = eos_id
        self.pad_id: int = pad_id

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 512) -> Tokenizer:
        """Learn BPE merges from `texts` until the vocabulary (bytes + specials + merges) has `vocab_size` entries."""
        minimum = _BYTE_ALPHABET + 2
        if vocab_size < minimum:
            raise LinglabError(f"tokenizer vocab_size must be at least {minimum} "
                               f"(256 bytes + 2 special tokens), got {vocab_size}")
        hf = tokenizers.Tokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOS, PAD],
            # Seed with all 256 bytes so text never seen in training still encodes.
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        hf.train_from_iterator((chunk for text in texts for chunk in text_chunks(text)), trainer=trainer)
        return cls(hf)

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Load a saved tokenizer (a `tokenizer.json` or a directory holding one); LinglabError if unusable."""
        file = _tokenizer_file(path)
        if not file.is_file():
            raise LinglabError(f"{file}: tokenizer file not found")
        try:
            hf = tokenizers.Tokenizer.from_file(str(file))
        except Exception as error:  # the library raises bare Exceptions for unreadable or foreign JSON
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise LinglabError(f"{file}: not a readable tokenizer ({reason})") from error
        try:
            return cls(hf)
        except LinglabError as error:
            raise LinglabError(f"{file}: {error}") from None

    def save(self, path: str | Path) -> Path:
        """Write `tokenizer.json` (to `path` itself if it ends in `.json`, else into that directory)."""
        file = _tokenizer_file(path)
        file.parent.mkdir(parents=True, exist_ok=True)
        self.hf_tokenizer.save(str(file))
        return file

    @property
    def vocab_size(self) -> int:
        """The number of distinct ids this tokenizer can produce, special tokens included."""
        return self.hf_tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids for `text`; no special tokens are added."""
        return self.hf_tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` for many texts at once (in parallel inside the library)."""
        return [e.ids for e in self.hf_tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """The text for `ids`, with special tokens dropped."""
        return self.hf_tokenizer.decode(list(ids), skip_special_tokens=True)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load the tokenizer saved at `path`, raising LinglabError with a one-line reason if it cannot."""
    return Tokenizer.from_file(path)
