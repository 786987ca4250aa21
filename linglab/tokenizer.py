"""A tiny byte-level BPE tokenizer in which every digit is its own token, and tokenizer directories in the HF layout.

A thin wrapper around the Hugging Face `tokenizers` library. Digits are split off before BPE runs, so
no merge ever spans two digits: column arithmetic stays one token per digit. Byte-level encoding
means any text round-trips exactly through `encode`/`decode`. Two special tokens: `<|eos|>` ends
every document and `<|pad|>` fills unused positions.

    tok = Tokenizer.train(iter_corpus_texts(20_000, seed=0), vocab_size=512)
    tok.save("run/tokenizer.json")        # and run/tokenizer_config.json beside it
    tok = load_tokenizer("run")           # a directory means <dir>/tokenizer.json
    ids = tok.encode("47+58=?\\n")
    text = tok.apply_chat_template([{"role": "user", "content": "47+58=?\\n"}])   # "47+58=?\\n"

A tokenizer directory is in the Hugging Face layout (SPEC §1.6, §10): beside `tokenizer.json`, `tokenizer_config.json`
names the special tokens (`eos_token`, `pad_token`, `bos_token`, ...) and holds the Jinja `chat_template`
(`chat_template.jinja`, where newer transformers versions write it, wins when present). So a user's tokenizer loads
with its own EOS (Ling's is `<|endoftext|>`) and template; without a `pad_token`, padding uses EOS (padded positions
are masked by length, never by id). A linglab checkpoint loads in transformers (`AutoTokenizer.from_pretrained(ckpt)`)
with linglab's template. A `tokenizer.json` alone is linglab's own: `<|eos|>`, `<|pad|>` and
`chat.LINGLAB_CHAT_TEMPLATE`.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from linglab.chat import LINGLAB_CHAT_TEMPLATE, compile_template, render_conversation, render_template
from linglab.errors import LinglabError

EOS = "<|eos|>"
PAD = "<|pad|>"
FILE_NAME = "tokenizer.json"
CONFIG_FILE_NAME = "tokenizer_config.json"
TEMPLATE_FILE_NAME = "chat_template.jinja"
FILE_NAMES = (FILE_NAME, CONFIG_FILE_NAME, TEMPLATE_FILE_NAME)  # what copying a tokenizer directory copies
# The named special tokens of a transformers tokenizer, as tokenizer_config.json spells them; templates see them.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
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


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    """The tokenizer files of directory `src` (tokenizer.json, tokenizer_config.json, chat_template.jinja: those
    present) into `dst`, so a copied checkpoint keeps its special tokens and chat template."""
    for name in FILE_NAMES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


def _read_config(file: Path) -> tuple[dict[str, str], str | None, str]:
    """(special tokens, chat template, where the template came from) of the tokenizer_config.json and
    chat_template.jinja beside tokenizer.json `file`; ({}, None, "") when there are none."""
    config_file, template_file = file.with_name(CONFIG_FILE_NAME), file.with_name(TEMPLATE_FILE_NAME)
    config = {}
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise LinglabError(f"{config_file}: not valid JSON ({error})") from None
        if not isinstance(config, dict):
            raise LinglabError(f"{config_file}: expected a JSON object, got {type(config).__name__}")
    special = {}
    for name in SPECIAL_TOKEN_NAMES:
        token = config.get(name)
        if isinstance(token, dict):  # transformers writes AddedToken-style {"content": ..., "lstrip": ...}
            token = token.get("content")
        if token is not None and not isinstance(token, str):
            raise LinglabError(f"{config_file}: {name} must be a string or {{\"content\": ...}}, got {token!r}")
        if token is not None:
            special[name] = token
    template, source = config.get("chat_template"), str(config_file)
    if isinstance(template, list):  # several named templates: transformers uses "default"
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if "default" not in named:
            raise LinglabError(f"{config_file}: chat_template lists templates {sorted(map(str, named))} "
                               "but none named 'default'")
        template = named["default"]
    if template_file.is_file():
        template, source = template_file.read_text(encoding="utf-8"), str(template_file)
    if template is not None and not isinstance(template, str):
        raise LinglabError(f"{config_file}: chat_template must be a string, got {type(template).__name__}")
    if template is not None:
        compile_template(template, source)
    return special, template, source


class Tokenizer:
    """Byte-level BPE with single-digit tokens, its special tokens and chat template.

    `special_tokens`: the named special tokens (SPECIAL_TOKEN_NAMES) as strings, as templates see them and `save`
    writes them; default linglab's `<|eos|>` and `<|pad|>`. EOS defaults to `<|eos|>` and must be in the vocabulary;
    PAD, when not named, is `<|pad|>` if the vocabulary has it, else EOS. `template_source` names where
    `chat_template` came from, for error messages.
    """

    def __init__(self, hf_tokenizer: tokenizers.Tokenizer, special_tokens: dict[str, str] | None = None,
                 chat_template: str | None = None, template_source: str = "LINGLAB_CHAT_TEMPLATE") -> None:
        self.hf_tokenizer = hf_tokenizer
        self.special_tokens = {"eos_token": EOS, "pad_token": PAD} if special_tokens is None else dict(special_tokens)
        self.special_tokens.setdefault("eos_token", EOS)
        self.chat_template, self.template_source = chat_template, template_source
        eos = self.special_tokens["eos_token"]
        pad = self.special_tokens.get("pad_token", PAD if hf_tokenizer.token_to_id(PAD) is not None else eos)
        for name, token in (("eos_token", eos), ("pad_token", pad)):
            if hf_tokenizer.token_to_id(token) is None:
                raise LinglabError(f"tokenizer has no {token} token (its {name}; {CONFIG_FILE_NAME} names the "
                                   "special tokens)")
        self.eos_id: int = hf_tokenizer.token_to_id(eos)
        self.pad_id: int = hf_tokenizer.token_to_id(pad)

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
        return cls(hf, chat_template=LINGLAB_CHAT_TEMPLATE)

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Load a saved tokenizer (a `tokenizer.json` or a directory holding one) with the tokenizer_config.json and
        chat_template.jinja beside it, if any; LinglabError if unusable."""
        file = _tokenizer_file(path)
        if not file.is_file():
            raise LinglabError(f"{file}: tokenizer file not found")
        try:
            hf = tokenizers.Tokenizer.from_file(str(file))
        except Exception as error:  # the library raises bare Exceptions for unreadable or foreign JSON
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise LinglabError(f"{file}: not a readable tokenizer ({reason})") from error
        if file.with_name(CONFIG_FILE_NAME).is_file() or file.with_name(TEMPLATE_FILE_NAME).is_file():
            special, template, source = _read_config(file)
        else:  # linglab's own, saved before tokenizer_config.json was written
            special, template, source = None, LINGLAB_CHAT_TEMPLATE, "LINGLAB_CHAT_TEMPLATE"
        try:
            return cls(hf, special, template, source)
        except LinglabError as error:
            raise LinglabError(f"{file}: {error}") from None

    def save(self, path: str | Path) -> Path:
        """Write `tokenizer.json` (to `path` itself if it ends in `.json`, else into that directory) and
        `tokenizer_config.json` beside it: the special tokens, the chat template and the class transformers loads."""
        file = _tokenizer_file(path)
        file.parent.mkdir(parents=True, exist_ok=True)
        self.hf_tokenizer.save(str(file))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **self.special_tokens}
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        file.with_name(CONFIG_FILE_NAME).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                    encoding="utf-8")
        return file

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, tokenize: bool = False,
                            **kwargs) -> str | list[int]:
        """The chat template rendered as transformers renders it (the special tokens as variables, `kwargs` over
        them); with `tokenize`, its ids, no special tokens added (the template writes its own)."""
        if self.chat_template is None:
            raise LinglabError("the tokenizer has no chat template (add chat_template to its tokenizer_config.json)")
        text = render_template(self.chat_template, messages, add_generation_prompt, **{**self.special_tokens, **kwargs})
        return self.encode(text) if tokenize else text

    @functools.cached_property
    def stop_ids(self) -> tuple[int, ...]:
        """The ids that end a generated reply: EOS, and the chat template's end-of-turn marker when that is another
        single token (Ling-style templates close a turn with `<|role_end|>`, not EOS). The marker is what the
        template writes after a reply's text (`chat.render_conversation` of a one-turn conversation)."""
        marker = None
        if self.chat_template is not None:
            try:
                pieces = render_conversation(self, [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}])
                reply = next(text for text, is_assistant in pieces if is_assistant)
                marker = reply[reply.index("r") + 1:].strip() if "r" in reply else None
            except LinglabError:  # a template that cannot render a plain turn: EOS alone
                marker = None
        marker_id = None if not marker else self.hf_tokenizer.token_to_id(marker)
        return (self.eos_id,) if marker_id in (None, self.eos_id) else (self.eos_id, marker_id)

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
