"""Chat templates and the instant/thinking modes (SPEC §10): the text a chat model is prompted and trained with.

A tokenizer directory in the Hugging Face layout carries a Jinja `chat_template` (`tokenizer_config.json`, or
`chat_template.jinja`); linglab renders it itself, with the sandbox, options and variables Hugging Face transformers
uses, so the text is the one transformers renders for the same template, messages and kwargs (tests/test_chat.py
compares them):

    render_template(template, [{"role": "user", "content": "47+58=?\\n"}], eos_token="<|eos|>")   # "47+58=?\\n"
    render_prompt(tokenizer, messages, mode="thinking")          # the text the model continues from
    render_conversation(tokenizer, messages)                     # [(text, is_assistant), ...]: SFT's loss mask

LINGLAB_CHAT_TEMPLATE, the template of tokenizers linglab trains, is the pretraining document format (prompt +
solution + EOS), so a model pretrained on the embedded tasks is prompted exactly as it was trained:
- a system or user message is its content, plus "\\n" unless it already ends in one;
- an assistant message is its content followed by `eos_token`;
- `thinking=True` (default false) opens `<think>\\n` before each assistant turn and, with `add_generation_prompt`,
  at the end, for the model to write its reasoning in (then `</think>` and the answer); instant mode adds nothing.

    user "47+58=?\\n"                                  -> "47+58=?\\n"
    system "Be brief.", user "47+58=?"                -> "Be brief.\\n47+58=?\\n"
    user "1+1=?\\n", assistant "answer: 2"             -> "1+1=?\\nanswer: 2<|eos|>"
    user "1+1=?\\n" with thinking, generation prompt  -> "1+1=?\\n<think>\\n"

Modes: `mode="thinking"` passes `thinking=True` and `enable_thinking=True` (the name other templates read, e.g.
Qwen3's) to the template, `mode="instant"` passes both false (templates that default to thinking need the explicit
false). A `system_prompt` replaces the conversation's own system message, if it has one: the run's setting wins, so
prompt variants (ApexEval, SPEC §6) differ only in what the variant says.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import Protocol

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from linglab.errors import LinglabError

MODES = ("instant", "thinking")


class ChatTokenizer(Protocol):
    """What rendering needs of a `linglab.tokenizer.Tokenizer` (a protocol, not an import: tokenizer.py imports this
    module)."""

    chat_template: str | None
    template_source: str  # where the template came from, for errors
    special_tokens: dict[str, str]  # eos_token, pad_token, ... as the template sees them


_NO_TEMPLATE_FOR_THINKING = ("thinking mode needs a chat template; the tokenizer has none "
                             "(add chat_template to its tokenizer_config.json)")

LINGLAB_CHAT_TEMPLATE = (
    "{%- set thinking = thinking is defined and thinking -%}\n"
    "{%- for message in messages -%}\n"
    "    {%- if message['role'] == 'assistant' -%}\n"
    "        {%- if thinking %}{{ '<think>\\n' }}{% endif -%}\n"
    "        {{- message['content'] + eos_token -}}\n"
    "    {%- elif message['role'] in ('system', 'user') -%}\n"
    "        {{- message['content'] -}}\n"
    "        {%- if not message['content'].endswith('\\n') %}{{ '\\n' }}{% endif -%}\n"
    "    {%- else -%}\n"
    "        {{- raise_exception('unknown role ' + message['role'] + ' (expected system, user or assistant)') -}}\n"
    "    {%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt and thinking %}{{ '<think>\\n' }}{% endif -%}\n"
)


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`, which transformers' templates may use to mark the assistant's text:
    parsed so such templates load, rendered as its body (linglab finds the assistant's text by prefixes instead)."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML, which would change the prompt; templates want plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@functools.lru_cache(maxsize=16)
def compile_template(template: str, source: str = "chat template") -> jinja2.Template:
    """The compiled template, in a sandbox (templates come from downloaded checkpoints); one line naming `source`
    if it does not parse."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as error:
        raise LinglabError(f"{source}: the chat template does not parse (line {error.lineno}: {error.message})") from None


def render_template(template: str, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
    """`template` rendered with the variables transformers passes: messages, add_generation_prompt, tools and
    documents (None), and `kwargs` (the special tokens as strings, `thinking`, ...); one line if it raises."""
    # As transformers does: keys whose value is None are dropped (templates test for a missing key).
    messages = [{key: value for key, value in dict(m).items() if value is not None} for m in messages]
    try:
        return compile_template(template).render(messages=messages, tools=None, documents=None,
                                                 add_generation_prompt=add_generation_prompt, **kwargs)
    except jinja2.TemplateError as error:  # raise_exception, an undefined variable, a sandbox violation
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise LinglabError(f"chat template: {reason}") from None


def mode_kwargs(mode: str) -> dict[str, bool]:
    """The template variables of a mode: `thinking` (linglab's and Ling-style templates) and `enable_thinking`."""
    if mode not in MODES:
        raise LinglabError(f"unknown mode {mode!r} (expected one of {', '.join(MODES)})")
    on = mode == "thinking"
    return {"thinking": on, "enable_thinking": on}


def with_system_prompt(messages: list[dict], system_prompt: str) -> list[dict]:
    """`messages` with `system_prompt` as the system message ("" adds nothing); it replaces one already there."""
    messages = [dict(m) for m in messages]
    if not system_prompt:
        return messages
    if messages and messages[0].get("role") == "system":
        messages = messages[1:]
    return [{"role": "system", "content": system_prompt}, *messages]


def render_prompt(tokenizer: ChatTokenizer, messages: list[dict], mode: str = "instant", system_prompt: str = "") -> str:
    """The text the model continues from: the tokenizer's template with its generation prompt, in `mode`.

    Without a template the contents joined by newlines (a single user message renders as its content, the embedded
    tasks' plain prompt); thinking mode then has nothing to mark it and is a one-line error.
    """
    kwargs = mode_kwargs(mode)
    messages = with_system_prompt(messages, system_prompt)
    if tokenizer.chat_template is not None:
        return render_template(tokenizer.chat_template, messages, True, **tokenizer.special_tokens, **kwargs)
    if mode == "thinking":
        raise LinglabError(_NO_TEMPLATE_FOR_THINKING)
    return "\n".join(m["content"] for m in messages)


def render_conversation(tokenizer: ChatTokenizer, messages: list[dict], mode: str = "instant",
                        system_prompt: str = "") -> list[tuple[str, bool]]:
    """The conversation as (text, is_assistant) pieces whose concatenation is its rendering without a generation
    prompt; SFT puts the loss on the is_assistant pieces (each reply and the end-of-turn marker that closes it).

    An assistant piece is what rendering through message i adds to rendering the messages before it with the
    generation prompt; that must be a prefix, or the template (e.g. one that drops earlier replies' reasoning)
    cannot say which text the model wrote: a one-line error. Without a template: linglab's format.
    """
    messages = with_system_prompt(messages, system_prompt)
    kwargs = {**tokenizer.special_tokens, **mode_kwargs(mode)}
    template, source = tokenizer.chat_template, tokenizer.template_source
    if template is None:
        if mode == "thinking":
            raise LinglabError(_NO_TEMPLATE_FOR_THINKING)
        template, source = LINGLAB_CHAT_TEMPLATE, "LINGLAB_CHAT_TEMPLATE"

    def render(upto: list[dict], generation_prompt: bool) -> str:
        return render_template(template, upto, generation_prompt, **kwargs)

    pieces, done = [], ""
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before, through = render(messages[:i], True), render(messages[:i + 1], False)
        if not (before.startswith(done) and through.startswith(before)):
            raise LinglabError(f"{source}: the chat template is not prefix-stable at message {i + 1} (rendering the "
                               "messages before it with the generation prompt is not a prefix of rendering through "
                               "it), so the assistant's text cannot be found for SFT")
        pieces += [(before[len(done):], False), (through[len(before):], True)]
        done = through
    full = render(messages, False)
    if not full.startswith(done):
        raise LinglabError(f"{source}: the chat template is not prefix-stable (rendering the whole conversation "
                           "does not start with rendering it through the last assistant message)")
    pieces.append((full[len(done):], False))
    return [(text, is_assistant) for text, is_assistant in pieces if text]
