"""The tokenizer: one token per digit, exact round trips, saving and loading, clear load errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from linglab.chat import LINGLAB_CHAT_TEMPLATE
from linglab.errors import LinglabError
from linglab.tasks import CORE_TIERS, generate_problems, iter_corpus_texts
from linglab.tokenizer import Tokenizer, load_tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(iter_corpus_texts(2000, seed=0), vocab_size=512)


def test_special_tokens_and_size(tokenizer: Tokenizer) -> None:
    assert {tokenizer.eos_id, tokenizer.pad_id} == {0, 1}
    assert 258 < tokenizer.vocab_size <= 512
    assert tokenizer.decode([tokenizer.eos_id, tokenizer.pad_id]) == ""


def test_digits_are_single_tokens(tokenizer: Tokenizer) -> None:
    digit_ids = [tokenizer.encode(d) for d in "0123456789"]
    assert all(len(ids) == 1 for ids in digit_ids)
    number = "9081726354"
    assert tokenizer.encode(number) == [ids[0] for ids in (tokenizer.encode(d) for d in number)]
    # Digits stay single tokens inside text too: "1000" in a sentence is four digit tokens.
    ids = tokenizer.encode("Ann has 1000 apples.")
    assert [tokenizer.decode([i]) for i in ids].count("0") == 3


@pytest.mark.parametrize("text", [
    "47+58=?\n47+58\n7+8+0=15\n4+5+1=10\nanswer: 105",
    "  leading spaces,\ttabs\n\n\ntrailing space \n",
    "Ünïcödé — text ✓ and 中文",
    "",
])
def test_round_trip(tokenizer: Tokenizer, text: str) -> None:
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.encode_batch([text, text]) == [tokenizer.encode(text)] * 2


def test_documents_fit_the_context(tokenizer: Tokenizer) -> None:
    """The core tiers fit the tiny preset's 128-token rows with room; `long` is for longer contexts by design."""
    for tier in CORE_TIERS:
        for problem in generate_problems(300, (tier,), seed=tier, split="train"):
            assert len(tokenizer.encode(problem.prompt)) + len(tokenizer.encode(problem.solution)) + 1 < 96


def test_save_and_load(tokenizer: Tokenizer, tmp_path: Path) -> None:
    text = "Cara has 312 coins and sells 99. How many coins now?\n"
    saved = tokenizer.save(tmp_path / "run")
    assert saved == tmp_path / "run" / "tokenizer.json"
    assert (tmp_path / "run" / "tokenizer_config.json").is_file()  # special tokens and chat template (test_chat.py)
    for path in (tmp_path / "run", saved):
        loaded = load_tokenizer(path)
        assert loaded.encode(text) == tokenizer.encode(text)
        assert loaded.vocab_size == tokenizer.vocab_size
        assert (loaded.eos_id, loaded.pad_id) == (tokenizer.eos_id, tokenizer.pad_id)
        assert loaded.chat_template == tokenizer.chat_template == LINGLAB_CHAT_TEMPLATE
    assert Tokenizer.from_file(tokenizer.save(tmp_path / "named.json")).encode(text) == tokenizer.encode(text)


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(LinglabError, match="not found"):
        load_tokenizer(tmp_path / "missing")
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    with pytest.raises(LinglabError, match="garbage.json"):
        load_tokenizer(garbage)
    foreign = tmp_path / "foreign.json"
    foreign.write_text('{"hello": "world"}')
    with pytest.raises(LinglabError, match="foreign.json"):
        load_tokenizer(foreign)


def test_file_without_special_tokens(tmp_path: Path) -> None:
    import tokenizers

    plain = tokenizers.Tokenizer(tokenizers.models.BPE())
    plain.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(LinglabError, match="<\\|eos\\|>") as error:
        load_tokenizer(tmp_path)
    assert "tokenizer.json" in str(error.value) and "\n" not in str(error.value)


def test_vocab_too_small() -> None:
    with pytest.raises(LinglabError, match="at least 258"):
        Tokenizer.train(["abc"], vocab_size=100)
