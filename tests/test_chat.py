"""Chat templates (SPEC §10): linglab renders what transformers renders, the embedded prompts stay unchanged, the
SFT pieces of a conversation, and tokenizer directories in the Hugging Face layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tokenizers
from conftest import tiny_config
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from linglab.chat import LINGLAB_CHAT_TEMPLATE, render_conversation, render_prompt, render_template
from linglab.checkpoint import export_checkpoint, save_pretrained
from linglab.errors import LinglabError
from linglab.model import build_model
from linglab.tasks import TIERS, generate_problems, iter_corpus_texts
from linglab.tokenizer import Tokenizer, load_tokenizer

LING_STYLE = (Path(__file__).parent / "assets" / "chat" / "ling_style.jinja").read_text()
LING_SPECIALS = ["<|endoftext|>", "<role>", "</role>", "<|role_end|>"]

CONVERSATIONS = {
    "one user message": [{"role": "user", "content": "47+58=?\n"}],
    "system + user": [{"role": "system", "content": "Answer with one number."},
                      {"role": "user", "content": "What is 12 times 3? 答案?"}],
    "multi-turn": [{"role": "system", "content": "Be brief.\n"},
                   {"role": "user", "content": "1+1=?\n"},
                   {"role": "assistant", "content": "2\nanswer: 2"},
                   {"role": "user", "content": "And 2+2=?"},
                   {"role": "assistant", "content": "<think>\n2+2</think>\nanswer: 4"},
                   {"role": "user", "content": "Now 3+3=?\n"}],
}


@pytest.fixture(scope="module")
def linglab_tok() -> Tokenizer:
    return Tokenizer.train(iter_corpus_texts(300, seed=0), vocab_size=300)


def write_user_tokenizer(directory: Path, template: str | None = LING_STYLE, **config) -> Path:
    """A tokenizer directory as a user brings it: Ling's `<|endoftext|>` EOS (an AddedToken dict), no pad token."""
    hf = tokenizers.Tokenizer(tokenizers.models.BPE())
    hf.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=LING_SPECIALS, show_progress=False,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(["What is 12 times 3? answer: 36", "detailed thinking on"] * 20, trainer=trainer)
    directory.mkdir(parents=True, exist_ok=True)
    hf.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast",
              "eos_token": {"__type": "AddedToken", "content": "<|endoftext|>", "lstrip": False, "normalized": False, "rstrip": False,
                            "single_word": False, "special": True}, **config}
    if template is not None:
        config["chat_template"] = template
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module")
def ling_dir(tmp_path_factory) -> Path:
    return write_user_tokenizer(tmp_path_factory.mktemp("ling") / "tok")


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("thinking", [False, True])
def test_linglab_template_renders_as_transformers(linglab_tok, conversation, add_generation_prompt, thinking):
    messages = CONVERSATIONS[conversation]
    theirs = PreTrainedTokenizerFast(tokenizer_object=linglab_tok.hf_tokenizer, eos_token="<|eos|>",
                                     pad_token="<|pad|>", chat_template=LINGLAB_CHAT_TEMPLATE)
    kwargs = dict(add_generation_prompt=add_generation_prompt, thinking=thinking)
    text = linglab_tok.apply_chat_template(messages, **kwargs)
    assert text == theirs.apply_chat_template(messages, tokenize=False, **kwargs)
    assert linglab_tok.apply_chat_template(messages, tokenize=True, **kwargs) \
        == theirs.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs)
    assert linglab_tok.apply_chat_template(messages, tokenize=True, **kwargs) == linglab_tok.encode(text)


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("thinking", [False, True])
def test_ling_style_template_renders_as_transformers(ling_dir, conversation, add_generation_prompt, thinking):
    messages = CONVERSATIONS[conversation]
    ours, theirs = load_tokenizer(ling_dir), AutoTokenizer.from_pretrained(ling_dir)
    kwargs = dict(add_generation_prompt=add_generation_prompt, thinking=thinking)
    text = ours.apply_chat_template(messages, **kwargs)
    assert text == theirs.apply_chat_template(messages, tokenize=False, **kwargs)
    assert f"detailed thinking {'on' if thinking else 'off'}<|role_end|>" in text
    assert text.endswith("<role>ASSISTANT</role>") == add_generation_prompt
    ids = ours.apply_chat_template(messages, tokenize=True, **kwargs)
    assert ids == theirs.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs)
    assert ours.hf_tokenizer.token_to_id("<|role_end|>") in ids  # the template's markers are single special tokens


def test_jinja_helpers_render_as_transformers(linglab_tok):
    """tojson (no HTML escaping, its keyword options), loop controls, raise_exception, the special-token variables."""
    template = ("{{ messages | tojson }}|{{ messages[0] | tojson(indent=2, sort_keys=True) }}|"
                "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.role }}{% endfor %}|"
                "{{ eos_token }}{{ pad_token }}{{ bos_token is defined }}|{{ strftime_now('%Y') | length }}")
    messages = [{"role": "user", "content": "a<b & 'c' 中"}, {"role": "assistant", "content": "x"}]
    theirs = PreTrainedTokenizerFast(tokenizer_object=linglab_tok.hf_tokenizer, eos_token="<|eos|>",
                                     pad_token="<|pad|>", chat_template=template)
    linglab_tok = Tokenizer(linglab_tok.hf_tokenizer, chat_template=template)
    assert linglab_tok.apply_chat_template(messages) == theirs.apply_chat_template(messages, tokenize=False,
                                                                                   add_generation_prompt=True)
    with pytest.raises(LinglabError, match="^chat template: unknown role tool") as error:
        render_template(LINGLAB_CHAT_TEMPLATE, [{"role": "tool", "content": "x"}], eos_token="<|eos|>")
    assert "\n" not in str(error.value)


def test_a_linglab_checkpoint_loads_in_transformers_with_its_template(linglab_tok, tmp_path):
    ckpt = tmp_path / "ckpt"
    save_pretrained(build_model(tiny_config(num_hidden_layers=1).model, seed=0), ckpt)
    linglab_tok.save(ckpt)
    theirs = AutoTokenizer.from_pretrained(ckpt)
    assert theirs.chat_template == LINGLAB_CHAT_TEMPLATE
    assert (theirs.eos_token_id, theirs.pad_token_id) == (linglab_tok.eos_id, linglab_tok.pad_id)
    messages = CONVERSATIONS["multi-turn"]
    assert theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) \
        == linglab_tok.apply_chat_template(messages)
    export_checkpoint(ckpt, tmp_path / "exported")  # copies carry the template along
    assert load_tokenizer(tmp_path / "exported").chat_template == LINGLAB_CHAT_TEMPLATE
    assert (tmp_path / "exported" / "tokenizer_config.json").read_text() == (ckpt / "tokenizer_config.json").read_text()


# ---------------------------------------------------------------- linglab's template and modes


def test_embedded_prompts_render_unchanged(linglab_tok):
    for tier in range(len(TIERS)):
        for problem in generate_problems(5, (tier,), seed=tier, split="train"):
            messages = [{"role": "user", "content": problem.prompt}]
            assert render_prompt(linglab_tok, messages) == problem.prompt
            assert render_prompt(linglab_tok, messages, mode="thinking") == problem.prompt + "<think>\n"
            document = render_conversation(linglab_tok, [*messages, {"role": "assistant", "content": problem.solution}])
            assert document == [(problem.prompt, False), (problem.solution + "<|eos|>", True)]  # the pretraining format
    assert render_prompt(linglab_tok, [{"role": "user", "content": "no newline"}]) == "no newline\n"


def test_system_prompt(linglab_tok):
    user = [{"role": "user", "content": "2+2=?\n"}]
    assert render_prompt(linglab_tok, user, system_prompt="") == "2+2=?\n"
    assert render_prompt(linglab_tok, user, system_prompt="Be brief.") == "Be brief.\n2+2=?\n"
    own = [{"role": "system", "content": "Be verbose."}, *user]
    assert render_prompt(linglab_tok, own) == "Be verbose.\n2+2=?\n"
    assert render_prompt(linglab_tok, own, system_prompt="Be brief.") == "Be brief.\n2+2=?\n"  # replaced
    with pytest.raises(LinglabError, match="unknown mode 'fast'"):
        render_prompt(linglab_tok, user, mode="fast")


def test_without_a_template(ling_dir, tmp_path):
    plain = load_tokenizer(write_user_tokenizer(tmp_path / "plain", template=None))
    assert plain.chat_template is None
    user = [{"role": "user", "content": "47+58=?"}]
    assert render_prompt(plain, user) == "47+58=?"
    assert render_prompt(plain, user, system_prompt="Be brief.") == "Be brief.\n47+58=?"
    assert render_conversation(plain, [*user, {"role": "assistant", "content": "105"}]) \
        == [("47+58=?\n", False), ("105<|endoftext|>", True)]  # linglab's format, with this tokenizer's EOS
    with pytest.raises(LinglabError, match="thinking mode needs a chat template"):
        render_prompt(plain, user, mode="thinking")
    with pytest.raises(LinglabError, match="no chat template"):
        plain.apply_chat_template(user)


# ---------------------------------------------------------------- render_conversation: SFT's pieces


@pytest.mark.parametrize("mode", ["instant", "thinking"])
def test_conversation_pieces(linglab_tok, ling_dir, mode):
    messages = CONVERSATIONS["multi-turn"][:5]  # ends with the assistant's reply
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    thinking = mode == "thinking"
    for tok, end in ((linglab_tok, "<|eos|>"), (load_tokenizer(ling_dir), "<|role_end|>")):
        pieces = render_conversation(tok, messages, mode=mode)
        full = tok.apply_chat_template(messages, add_generation_prompt=False, thinking=thinking)
        assert "".join(text for text, _ in pieces) == full
        assert [text for text, is_assistant in pieces if is_assistant] == [reply + end for reply in replies]
        prompt = render_prompt(tok, messages[:4], mode=mode)
        assert full.startswith(prompt) and full[len(prompt):] == replies[1] + end
    ling = load_tokenizer(ling_dir)
    assert render_conversation(ling, messages[1:3], system_prompt="Be brief.") == [
        ("<role>SYSTEM</role>Be brief.\ndetailed thinking off<|role_end|><role>HUMAN</role>1+1=?\n<|role_end|>"
         "<role>ASSISTANT</role>", False), ("2\nanswer: 2<|role_end|>", True)]


def test_a_template_that_is_not_prefix_stable_is_refused(linglab_tok, tmp_path):
    # Like templates that drop earlier replies' reasoning: the generation prompt is not how a reply starts.
    template = ("{% for m in messages %}{% if m.role == 'assistant' %}<reply>{{ m.content }}{{ eos_token }}"
                "{% else %}{{ m.content }}{% endif %}{% endfor %}{% if add_generation_prompt %}<answer>{% endif %}")
    directory = tmp_path / "unstable"
    Tokenizer(linglab_tok.hf_tokenizer, chat_template=template).save(directory)
    messages = [{"role": "user", "content": "1+1=?\n"}, {"role": "assistant", "content": "2"}]
    with pytest.raises(LinglabError, match="tokenizer_config.json: the chat template is not prefix-stable at "
                                           "message 2") as error:
        render_conversation(load_tokenizer(directory), messages)
    assert "\n" not in str(error.value)


# ---------------------------------------------------------------- tokenizer directories in the HF layout


def test_tokenizer_config_round_trip(linglab_tok, ling_dir, tmp_path):
    saved = linglab_tok.save(tmp_path / "run")
    config = json.loads((tmp_path / "run" / "tokenizer_config.json").read_text())
    assert config == {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|eos|>", "pad_token": "<|pad|>",
                      "chat_template": LINGLAB_CHAT_TEMPLATE}
    loaded = load_tokenizer(saved)
    assert (loaded.chat_template, loaded.eos_id, loaded.pad_id) == (LINGLAB_CHAT_TEMPLATE, 0, 1)
    (tmp_path / "run" / "tokenizer_config.json").unlink()  # a checkpoint saved before the file existed
    assert load_tokenizer(saved).chat_template == LINGLAB_CHAT_TEMPLATE

    user = load_tokenizer(ling_dir)  # <|endoftext|> as EOS, no pad token: padding uses EOS
    eos = user.hf_tokenizer.token_to_id("<|endoftext|>")
    assert (user.eos_id, user.pad_id, user.chat_template) == (eos, eos, LING_STYLE)
    again = load_tokenizer(user.save(tmp_path / "copy"))
    assert (again.eos_id, again.pad_id, again.chat_template, again.special_tokens) \
        == (eos, eos, LING_STYLE, {"eos_token": "<|endoftext|>"})


def test_template_files_transformers_writes(ling_dir, tmp_path):
    listed = write_user_tokenizer(tmp_path / "listed", template=[{"name": "tool_use", "template": "T"},
                                                                 {"name": "default", "template": LING_STYLE}])
    assert load_tokenizer(listed).chat_template == LING_STYLE
    jinja = write_user_tokenizer(tmp_path / "jinja", template="ignored")
    (jinja / "chat_template.jinja").write_text("{{ messages[0].content }}!")
    assert load_tokenizer(jinja).apply_chat_template([{"role": "user", "content": "hi"}]) == "hi!"
    assert AutoTokenizer.from_pretrained(jinja).apply_chat_template([{"role": "user", "content": "hi"}],
                                                                   tokenize=False) == "hi!"


@pytest.mark.parametrize("config, message", [
    ("{not json", r"tokenizer_config.json: not valid JSON \(Expecting property name"),
    ("[1, 2]", "tokenizer_config.json: expected a JSON object, got list"),
    ('{"eos_token": "<|missing|>"}', r"tokenizer.json: tokenizer has no <\|missing\|> token \(its eos_token"),
    ('{"eos_token": "<|endoftext|>", "pad_token": 7}', "tokenizer_config.json: pad_token must be a string"),
    ('{"eos_token": "<|endoftext|>", "chat_template": "{% for m in messages %}{{ m }"}',
     r"tokenizer_config.json: the chat template does not parse \(line 1: "),
    ('{"eos_token": "<|endoftext|>", "chat_template": [{"name": "tool_use", "template": "x"}]}',
     "none named 'default'"),
])
def test_bad_tokenizer_configs(tmp_path, config, message):
    directory = write_user_tokenizer(tmp_path / "bad")
    (directory / "tokenizer_config.json").write_text(config)
    with pytest.raises(LinglabError, match=message) as error:
        load_tokenizer(directory)
    assert "\n" not in str(error.value) and str(directory) in str(error.value)


def test_bad_chat_template_jinja_names_its_file(ling_dir, tmp_path):
    directory = write_user_tokenizer(tmp_path / "bad")
    (directory / "chat_template.jinja").write_text("{% if messages %}unclosed")
    with pytest.raises(LinglabError, match=r"chat_template.jinja: the chat template does not parse \(line 1"):
        load_tokenizer(directory)


def test_generation_stops_at_the_templates_end_of_turn_marker(linglab_tok, ling_dir):
    """A Ling-style template closes a turn with <|role_end|>, not EOS: both end a generated reply (stop_ids), and the
    rollout keeps the one sampled."""
    import torch
    from conftest import tiny_config

    from linglab.generate import generate
    from linglab.model import build_model

    assert linglab_tok.stop_ids == (linglab_tok.eos_id,)
    ling = load_tokenizer(ling_dir)
    role_end = ling.hf_tokenizer.token_to_id("<|role_end|>")
    assert ling.stop_ids == (ling.eos_id, role_end) and role_end != ling.eos_id
    model = build_model(tiny_config(num_hidden_layers=1, vocab_size=ling.vocab_size).model, seed=0)
    with torch.no_grad():  # make <|role_end|> the greedy choice at every step
        model.lm_head.weight.zero_()
        model.lm_head.weight[role_end] = 1.0
        model.model.word_embeddings.weight.fill_(1.0)
    result = generate(model, [[1, 2, 3]], 8, ling.stop_ids, temperature=0.0)
    assert result.tokens == [[]] and result.finished == [True] and result.eos_tokens == [role_end]
    assert generate(model, [[1, 2, 3]], 4, ling.eos_id, temperature=0.0).finished == [False]  # EOS alone does not stop it
