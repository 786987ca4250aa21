"""Bad input gets one line and exit code 2 (issue 13, the validation half): each case typed as a user would.

Sections follow the issue's numbers: (5) non-finite config floats, (6) corrupted checkpoints, (9) tracebacks that
became one line, (10) inputs that were silently accepted or killed the process.
"""

import dataclasses
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file, save_file

from linglab import data as data_module
from linglab.checkpoint import (
    OPTIONAL_CONFIG_KEYS,
    CheckpointError,
    from_pretrained,
    hf_config_dict,
    load_state_into,
    save_pretrained,
    to_hf_state_dict,
)
from linglab.cli import main
from linglab.config import META_PRESETS, Config, ConfigError, load_config
from linglab.data import load_text_documents, text_token_stream
from linglab.errors import LinglabError
from linglab.generate import generate
from linglab.model import build_model
from linglab.tokenizer import CHUNK_CHARS, Tokenizer, text_chunks

# A 64-position model: the training and RL lengths must fit in it too (config validation checks them).
SHORT_CONTEXT = ["--model.max_position_embeddings=64", "--data.seq_len=32", "--rl.sft_seq_len=32",
                 "--rl.max_new_tokens=16"]


def short_context_model():
    return build_model(load_config("tiny", overrides=["--model.num_hidden_layers=1", *SHORT_CONTEXT]).model, seed=0)


def one_line_error(argv, capsys) -> str:
    """Run the CLI; it must exit 2 with exactly one `error: ...` line on stderr (and no traceback)."""
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


# ---------------------------------------------------------------- (5) non-finite floats in the config


FLOAT_KEYS = [f"{name}.{f.name}" for name, section in vars(Config()).items() for f in dataclasses.fields(section)
              if isinstance(getattr(section, f.name), float)]


def test_every_float_key_of_every_section_is_covered():
    assert {"train.lr", "model.rope_theta", "rl.icepop_beta", "fp8.underflow_warn", "rl.sft_lr"} <= set(FLOAT_KEYS)
    assert len(FLOAT_KEYS) > 30


@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_non_finite_float_is_refused_at_validation_for_every_float_key(key, capsys):
    for value, shown in (("inf", "inf"), ("nan", "nan"), ("-inf", "-inf"), ("1e400", "inf")):
        err = one_line_error(["params", f"--{key}={value}"], capsys)
        assert f"error: config: {key} must be a finite number, got {shown}" in err


@pytest.mark.parametrize("toml", ["lr = inf", "lr = nan", "lr = -inf"])
def test_non_finite_lr_in_toml_is_one_line(toml, tmp_path, capsys):
    (tmp_path / "c.toml").write_text(f"[train]\n{toml}\n")
    err = one_line_error(["train", "--config", tmp_path / "c.toml", "--out", tmp_path / "run"], capsys)
    assert "train.lr must be a finite number" in err


def test_cli_train_lr_inf_is_one_line(tmp_path, capsys):
    err = one_line_error(["train", "--train.lr=inf", "--out", tmp_path / "run"], capsys)
    assert "config: train.lr must be a finite number, got inf" in err


def test_programmatic_config_is_checked_too():
    cfg = load_config("tiny")
    cfg.rl.icepop_beta = math.inf
    with pytest.raises(ConfigError, match="rl.icepop_beta must be a finite number"):
        cfg.validate()


# ---------------------------------------------------------------- (6) corrupted checkpoints


@pytest.fixture
def ckpt(tmp_path):
    model = build_model(tiny_config(num_hidden_layers=2).model, seed=3)
    save_pretrained(model, tmp_path / "ckpt")
    return model, tmp_path / "ckpt"


def edit_config(path, **changes):
    d = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is KeyError:
            del d[key]
        else:
            d[key] = value
    (path / "config.json").write_text(json.dumps(d))


def export_error(path, tmp_path, capsys) -> str:
    """`linglab export` loads every tensor of --ckpt: the command a user runs on a checkpoint they were given."""
    err = one_line_error(["export", "--ckpt", path, "--out", tmp_path / "exported"], capsys)
    assert not (tmp_path / "exported").exists()
    return err


@pytest.mark.parametrize("key, value, message", [
    ("use_qk_norm", "false", 'use_qk_norm must be true or false, got "false"'),
    ("use_qk_norm", 0, "use_qk_norm must be true or false, got 0"),
    ("hidden_size", "128", 'hidden_size must be an integer, got "128"'),
    ("hidden_size", [128], "hidden_size must be an integer, got [128]"),
    ("num_experts", 16.0, "num_experts must be an integer, got 16.0"),
    ("rope_theta", "1e4", 'rope_theta must be a finite number, got "1e4"'),
    ("rope_theta", [10000.0], "rope_theta must be a finite number, got [10000.0]"),
    ("rope_theta", None, "rope_theta must be a finite number, got null"),
    ("rope_theta", math.inf, "rope_theta must be a finite number, got Infinity"),
    ("rms_norm_eps", math.nan, "rms_norm_eps must be a finite number, got NaN"),
    ("router_z_loss_coef", "0", 'router_z_loss_coef must be a finite number, got "0"'),  # optional, still typed
    ("rope_scaling", {"type": "yarn", "factor": 4.0}, 'rope_scaling is {"type": "yarn", "factor": 4.0}'),
    ("use_bias", "false", 'use_bias is "false"'),
    ("norm_topk_prob", 1, "norm_topk_prob is 1"),
    ("score_function", "softmax", 'score_function is "softmax"'),
])
def test_config_json_values_are_checked_against_the_schema_with_types(ckpt, tmp_path, capsys, key, value, message):
    _, path = ckpt
    edit_config(path, **{key: value})
    err = export_error(path, tmp_path, capsys)
    assert f"checkpoint {path / 'config.json'}: {message}" in err


REQUIRED_KEYS = [k for k in hf_config_dict(tiny_config().model) if k not in OPTIONAL_CONFIG_KEYS]


@pytest.mark.parametrize("key", REQUIRED_KEYS)
def test_a_missing_config_json_key_is_an_error_naming_it_not_a_default(ckpt, tmp_path, capsys, key):
    """The issue's case was rope_theta: the default 600000 took the place of the checkpoint's 10000."""
    _, path = ckpt
    edit_config(path, **{key: KeyError})
    assert f"config.json: missing key {key}; SPEC §1.6 requires it" in export_error(path, tmp_path, capsys)


def test_optional_keys_may_be_absent_and_rotary_dim_stands_for_partial_rotary_factor(ckpt):
    model, path = ckpt
    edit_config(path, **{k: KeyError for k in OPTIONAL_CONFIG_KEYS})
    assert from_pretrained(path).cfg == model.cfg  # the tiny preset keeps both at their defaults
    edit_config(path, partial_rotary_factor=KeyError, rotary_dim=model.cfg.head_dim // 2)
    assert from_pretrained(path).cfg.partial_rotary_factor == 0.5


def set_stored_dtype(file, name, dtype):
    """Rewrite one tensor's dtype in a safetensors header, bytes untouched (F32 -> I32: same size, as in the issue)."""
    data = bytearray(file.read_bytes())
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    header[name]["dtype"] = dtype
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= n
    file.write_bytes(bytes(data[:8]) + text.ljust(n) + bytes(data[8 + n:]))


def test_a_tensor_whose_stored_dtype_was_changed_to_i32_is_refused_not_cast(ckpt, tmp_path, capsys):
    _, path = ckpt
    set_stored_dtype(path / "model.safetensors", "lm_head.weight", "I32")
    err = export_error(path, tmp_path, capsys)
    assert "lm_head.weight is int32; linglab checkpoints hold float32" in err


def test_other_dtypes_are_refused_and_checked_state_dict_never_casts(ckpt):
    model, path = ckpt
    sd = load_file(str(path / "model.safetensors"))
    save_file(dict(sd, **{"model.norm.weight": sd["model.norm.weight"].bfloat16()}), str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="model.norm.weight is bfloat16"):
        from_pretrained(path)
    tensors = to_hf_state_dict(model)
    tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.int32)
    with pytest.raises(CheckpointError, match="model.norm.weight is torch.int32, the model expects torch.float32"):
        load_state_into(build_model(model.cfg), tensors, "test")


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_values_in_any_tensor_are_refused_with_its_name(ckpt, tmp_path, capsys, value):
    _, path = ckpt
    name = "model.layers.1.mlp.experts.3.down_proj.weight"
    sd = load_file(str(path / "model.safetensors"))
    sd[name][2, 5] = value
    save_file(sd, str(path / "model.safetensors"))
    err = export_error(path, tmp_path, capsys)
    assert f"{name} holds 1 non-finite value(s)" in err


def test_non_finite_fp8_scale_and_wrong_scale_dtype_are_refused(tmp_path):
    model = build_model(tiny_config(num_hidden_layers=1).model, seed=1)
    save_pretrained(model, tmp_path / "fp8", fp8=True)
    file = tmp_path / "fp8" / "model.safetensors"
    name = "model.layers.0.attention.dense.weight"
    sd = load_file(str(file))
    save_file(dict(sd, **{f"{name}_scale_inv": sd[f"{name}_scale_inv"].half()}), str(file))
    with pytest.raises(CheckpointError, match=f"{name}_scale_inv is float16; linglab checkpoints hold float32"):
        from_pretrained(tmp_path / "fp8")
    save_file(dict(sd, **{f"{name}_scale_inv": sd[f"{name}_scale_inv"].to(torch.float8_e4m3fn)}), str(file))
    with pytest.raises(CheckpointError, match=f"{name}_scale_inv is torch.float8_e4m3fn, expected torch.float32"):
        from_pretrained(tmp_path / "fp8")
    sd[f"{name}_scale_inv"][0, 0] = math.inf
    save_file(sd, str(file))
    with pytest.raises(CheckpointError, match=f"{name} holds .* non-finite value"):
        from_pretrained(tmp_path / "fp8")


SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


def shard(path) -> dict:
    """Split model.safetensors into two shards and a model.safetensors.index.json; returns the index."""
    sd = load_file(str(path / "model.safetensors"))
    names = sorted(sd)
    parts = {SHARDS[0]: names[: len(names) // 2], SHARDS[1]: names[len(names) // 2:]}
    for file, part in parts.items():
        save_file({n: sd[n] for n in part}, str(path / file), metadata={"format": "pt"})
    (path / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {n: file for file, part in parts.items() for n in part}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return index


def test_a_sharded_checkpoint_loads_bit_exact(ckpt):
    model, path = ckpt
    shard(path)
    loaded = from_pretrained(path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


def _first(index, file):
    return next(n for n, f in index["weight_map"].items() if f == file)


@pytest.mark.parametrize("corrupt, message", [
    (lambda p, index: (p / "model.safetensors.index.json").write_text("{not json"), "index.json: not valid JSON"),
    (lambda p, index: (p / "model.safetensors.index.json").write_bytes(b"\xff\xfe\x00"), "index.json: not valid JSON"),
    (lambda p, index: (p / "model.safetensors.index.json").write_text("[]"), "whose weight_map maps each tensor"),
    (lambda p, index: (p / "model.safetensors.index.json").write_text('{"metadata": {}}'), "whose weight_map maps"),
    (lambda p, index: (p / "model.safetensors.index.json").write_text('{"weight_map": {"a": 5}}'), "whose weight_map"),
    (lambda p, index: (p / SHARDS[1]).unlink(), f"missing {SHARDS[1]} (named in model.safetensors.index.json)"),
    (lambda p, index: (p / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": dict(index["weight_map"], **{"lm_head.weight": "../elsewhere.safetensors"})})),
     "shard '../elsewhere.safetensors' is not a .safetensors file name"),
    (lambda p, index: (p / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": dict(index["weight_map"], **{_first(index, SHARDS[0]): SHARDS[1]})})),
     f"is in {SHARDS[1]}, but it is in {SHARDS[0]}"),
    (lambda p, index: (p / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": dict(index["weight_map"], **{"model.extra.weight": SHARDS[0]})})),
     f"says model.extra.weight is in {SHARDS[0]}, but no shard holds it"),
    (lambda p, index: save_file(dict(load_file(str(p / SHARDS[1])), **load_file(str(p / SHARDS[0]))),
                                str(p / SHARDS[1])), f"is in both {SHARDS[0]} and {SHARDS[1]}"),
])
def test_a_bad_safetensors_index_is_one_line(ckpt, tmp_path, capsys, corrupt, message):
    _, path = ckpt
    corrupt(path, shard(path))
    assert message in export_error(path, tmp_path, capsys)


# ---------------------------------------------------------------- (9) tracebacks that are now one line


@pytest.mark.parametrize("toml, message", [
    ("[model]\nhidden_size = [128, 256]", "model.hidden_size expects an integer, got [128, 256]"),
    ("[model]\nhidden_size = 1979-05-27", "model.hidden_size expects an integer, got datetime.date(1979, 5, 27)"),
    ("[model.hidden_size]\nvalue = 1", "model.hidden_size expects an integer, got {'value': 1}"),
    ("[model]\nhidden_size = {value = 1}", "model.hidden_size expects an integer, got {'value': 1}"),
    ("[train]\nlr = [0.001]", "train.lr expects a number, got [0.001]"),
    ("[train]\nlr = 1979-05-27T07:32:00Z", "train.lr expects a number, got datetime.datetime"),
    ("[train]\nschedule = ['wsd']", "train.schedule expects a string, got ['wsd']"),
    ("[data]\npath = 07:32:00", "data.path expects a string, got datetime.time(7, 32)"),
    ("[fp8]\nenabled = 1979-05-27", "fp8.enabled expects true or false"),
    ("[data]\ntiers = 1", "data.tiers expects a list, got 1"),
    ("[data]\ntiers = [[1, 2]]", "data.tiers expects an integer, got [1, 2]"),
    ("[data]\ntiers = [1979-05-27]", "data.tiers expects an integer, got datetime.date"),
    ("[rl]\neval_ks = {k = 1}", "rl.eval_ks expects a list, got {'k': 1}"),
])
def test_toml_arrays_dates_and_tables_for_scalar_keys_and_scalars_for_lists(toml, message, tmp_path, capsys):
    (tmp_path / "c.toml").write_text(toml + "\n")
    assert message in one_line_error(["params", "--config", tmp_path / "c.toml"], capsys)


def corrupt_parquet(path, compression, **kw):
    texts = [f"document number {i} " + "word " * (i % 50) for i in range(2000)]
    pq.write_table(pa.table({"text": texts}), path, compression=compression, **kw)
    data = bytearray(path.read_bytes())
    if compression == "snappy":
        data[len(data) // 2: len(data) // 2 + 16] = bytes(range(200, 216))
    else:
        data[data.find(b"document number 1000") + 3] = 0xFF  # invalid UTF-8 in a string page
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("compression, kw, reason", [
    ("snappy", {}, "Corrupt snappy compressed data"),
    ("none", {}, "can't decode byte 0xff"),
    ("none", {"write_page_checksum": True}, "CRC checksum verification failed"),
])
def test_corrupted_parquet_pages_name_the_file(compression, kw, reason, tmp_path, capsys):
    path = tmp_path / "data.parquet"
    corrupt_parquet(path, compression, **kw)
    with pytest.raises(LinglabError, match=f"{path}: corrupted parquet data .*{reason}"):
        load_text_documents(path)
    err = one_line_error(["train", f"--data.path={path}", "--out", tmp_path / "run"], capsys)
    assert f"{path}: corrupted parquet data" in err


@pytest.mark.parametrize("argv, message", [
    (["--seq-len", "0"], "eval: --seq-len must be >= 8, got 0"),
    (["--seq-len", "-3"], "eval: --seq-len must be >= 8, got -3"),
    (["--seq-len", "65"], "eval: --seq-len 65 exceeds the model's max_position_embeddings (64)"),
    (["--problems", "0"], "eval: --problems must be >= 1, got 0"),
])
def test_eval_bad_lengths_are_one_line(argv, message, tmp_path, capsys):
    save_pretrained(short_context_model(), tmp_path / "c")
    assert message in one_line_error(["eval", "--ckpt", tmp_path / "c", *argv], capsys)


@pytest.mark.parametrize("seq_len", ["0", "7", "-128"])
def test_scaling_suggest_seq_len_below_the_minimum_is_one_line(seq_len, capsys):
    err = one_line_error(["scaling", "suggest", "--compute", "1e14", "--seq-len", seq_len], capsys)
    assert f"scaling suggest: --seq-len must be >= 8 (data.seq_len's minimum), got {seq_len}" in err


def result_row(name="shape-C1e+12-0", **changes):
    row = {"name": name, "axis": "shape", "budget": 1e12, "compute": 1e12, "kind": "moe",
           "model": {"hidden_size": 64, "num_hidden_layers": 2, "num_experts": 16, "num_experts_per_tok": 4},
           "activation_ratio": 0.3, "granularity": 4.0, "N": 1e5, "N_total": 2e5, "M": 6e5, "D": 1.6e6, "steps": 100,
           "lr": 3e-3, "lr_multiplier": 1.0, "batch_size": 8, "batch_tokens": 1024, "batch_multiplier": 1.0,
           "seq_len": 128, "train_loss": 0.5, "heldout_loss": 0.4, "wall_time_s": 1.0}
    row.update(changes)
    return {k: v for k, v in row.items() if v is not KeyError}


@pytest.mark.parametrize("content, message", [
    (bytes(range(256)) * 8, "is not a JSON-lines results file (binary data at byte 128)"),
    (b"\x00\x01{}\n" * 10, "is not a JSON-lines results file (binary data at byte 0)"),
    ([result_row(heldout_loss=KeyError)], "run 'shape-C1e+12-0' has no 'heldout_loss' column"),
    ([result_row(), result_row("b", budget=KeyError)], "run 'b' has no 'budget' column"),
    ([result_row(model=KeyError)], "has no 'model' column"),
    ([result_row(heldout_loss=math.nan)], "heldout_loss must be a positive finite number, got NaN"),
    ([result_row(heldout_loss=math.inf)], "heldout_loss must be a positive finite number, got Infinity"),
    ([result_row(heldout_loss="0.4")], 'heldout_loss must be a positive finite number, got "0.4"'),
    ([result_row(train_loss=math.nan)], "train_loss must be a finite number or null, got NaN"),
    ([result_row(compute=-1.0)], "compute must be a positive finite number, got -1.0"),
    ([result_row(axis="depth")], "axis 'depth' / kind 'moe'"),
    ([result_row(model={"hidden_size": 64})], "model must map hidden_size, num_hidden_layers"),
    ([{"loss": 0.4}], "has a row without a run 'name'"),
])
def test_scaling_fit_bad_results_are_one_line(content, message, tmp_path, capsys):
    results = tmp_path / "results.jsonl"
    if isinstance(content, bytes):
        results.write_bytes(content)
    else:
        results.write_text("".join(json.dumps(row) + "\n" for row in content))
    err = one_line_error(["scaling", "fit", "--dir", tmp_path, "--bootstrap", "0"], capsys)
    assert f"scaling: {results}" in err and message in err
    assert not (tmp_path / "fit.json").exists()


def test_scaling_fit_negative_bootstrap_is_one_line(tmp_path, capsys):
    (tmp_path / "results.jsonl").write_text(json.dumps(result_row()) + "\n")
    err = one_line_error(["scaling", "fit", "--dir", tmp_path, "--bootstrap", "-5"], capsys)
    assert "scaling fit: --bootstrap must be >= 0, got -5" in err


# ---------------------------------------------------------------- (10) silently accepted or killed


@pytest.mark.parametrize("preset", META_PRESETS)
def test_check_refuses_the_released_shapes_as_init_does(preset, capsys):
    err = one_line_error(["check", "--preset", preset], capsys)
    assert f"check: preset {preset} has" in err and "too large to materialise here" in err


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "0"], "check: --batch-size must be >= 1, got 0"),
    (["--batch-size", "-1"], "check: --batch-size must be >= 1, got -1"),
    (["--seq-len", "0"], "check: --seq-len must be >= 1, got 0"),
    (["--seq-len", "65", *SHORT_CONTEXT], "a sequence of 65 positions exceeds max_position_embeddings (64)"),
])
def test_check_bad_batch_and_length_are_one_line(argv, message, capsys):
    assert message in one_line_error(["check", "--model.num_hidden_layers=1", *argv], capsys)


def test_scaling_suggest_negative_compute_is_one_line_with_the_equals_form(capsys):
    err = one_line_error(["scaling", "suggest", "--compute", "-1e14"], capsys)
    assert "argument --compute: expected one argument (write --compute=VALUE for a value that starts with '-')" in err
    err = one_line_error(["scaling", "suggest", "--compute=-1e14"], capsys)
    assert "--compute must be a positive number of FLOPs, got '-1e14'" in err


@pytest.mark.parametrize("argv, message", [
    (["nosuchcommand"], "linglab: argument command: invalid choice: 'nosuchcommand'"),
    (["train", "--preset", "huge"], "linglab train: argument --preset: invalid choice: 'huge'"),
    (["check", "--batch-size", "many"], "linglab check: argument --batch-size: invalid int value: 'many'"),
    (["scaling", "suggest"], "the following arguments are required: --compute"),
])
def test_argparse_errors_are_one_line_without_the_usage_block(argv, message, capsys):
    assert message in one_line_error(argv, capsys)


@pytest.mark.parametrize("override, message", [
    ("--data.seq_len=65", "data.seq_len (65) must be <="),
    ("--rl.sft_seq_len=65", "rl.sft_seq_len (65) must be <="),
    ("--rl.max_new_tokens=64", "rl.max_new_tokens (64) leaves no room for a prompt within"),
])
def test_config_refuses_training_lengths_beyond_max_position_embeddings(override, message, capsys):
    load_config("tiny", overrides=SHORT_CONTEXT)
    err = one_line_error(["params", *SHORT_CONTEXT, override], capsys)
    assert f"config: {message} model.max_position_embeddings (64)" in err


def test_forward_and_generate_refuse_sequences_longer_than_max_position_embeddings():
    model = short_context_model().eval()
    model(torch.zeros(1, 64, dtype=torch.long))  # exactly the limit runs
    with pytest.raises(LinglabError, match=r"a sequence of 65 positions exceeds max_position_embeddings \(64\)"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(LinglabError, match=r"prompt 1 \(60 tokens\) \+ max_new_tokens \(5\) exceeds .* \(64\)"):
        generate(model, [[1] * 10, [1] * 60], 5, eos_id=0)
    assert len(generate(model, [[1] * 60], 4, eos_id=-1, temperature=0.0).tokens[0]) == 4  # 64 in all: allowed
    result = generate(model, [[1] * 10, [1] * 50], [50, 14], eos_id=-1, temperature=0.0)  # per-row limits, padded
    assert [len(t) for t in result.tokens] == [50, 14]


def test_cli_generate_a_360_token_prompt_on_a_64_position_model_is_one_line(tmp_path, capsys):
    path = tmp_path / "c"
    save_pretrained(short_context_model(), path)
    Tokenizer.train(["1+1=?\n2"] * 4, vocab_size=300).save(path)
    err = one_line_error(["generate", "--ckpt", path, "--prompt", "7" * 360, "--max-new-tokens", "4"], capsys)
    assert "prompt 0 (361 tokens) + max_new_tokens (4) exceeds the model's max_position_embeddings (64)" in err


# An 8 MB single-line text file took GBs to load (benchmarks/text_memory.py measures the peak; README "What linglab
# protects"). What bounds it is tested here, not measured: no tokenizer call sees more than one batch of pieces, each
# at most CHUNK_CHARS long, and the pieces change no token.

WORDS = ["the", "cat's", "47+58=105", "answer:", "é", "中文", "x,y", "--", "12", "'t", "a\tb", "🙂"]


def word_text(n_words: int, seed: int) -> str:
    """Words split by single spaces or newlines: a cut point within every few characters."""
    rng = np.random.default_rng(seed)
    return "".join(WORDS[i] + (" ", " ", "\n")[j] for i, j in zip(rng.integers(0, len(WORDS), n_words),
                                                                    rng.integers(0, 3, n_words)))


def test_text_chunks_cut_at_pretoken_boundaries_and_change_no_token():
    texts = [word_text(n, seed) for seed, n in enumerate(range(1, 400, 7))]
    whole = Tokenizer.train(texts, vocab_size=400)
    pieces = [list(text_chunks(t, 20)) for t in texts]
    assert all("".join(p) == t and all(len(c) <= 20 for c in p) for p, t in zip(pieces, texts))
    assert sum(len(p) for p in pieces) > 5 * len(texts)
    assert all([i for c in p for i in whole.encode(c)] == whole.encode(t) for p, t in zip(pieces, texts))
    # Training on the pieces learns the same merges as training on the whole texts.
    chunked = Tokenizer.train([c for p in pieces for c in p], vocab_size=400)
    assert chunked.hf_tokenizer.to_str() == whole.hf_tokenizer.to_str()
    # No boundary in reach (a run without single spaces): cut at the limit, nothing lost.
    assert list(text_chunks("a" * 50 + "  b", 20)) == ["a" * 20, "a" * 20, "a" * 10 + "  b"]


def test_one_huge_line_is_encoded_in_bounded_calls_with_the_same_tokens(monkeypatch):
    tokenizer = Tokenizer.train([word_text(2000, 0)], vocab_size=400)
    huge = word_text(80000, 1).replace("\n", " ")  # one line of ~5 CHUNK_CHARS
    assert len(huge) > 4 * CHUNK_CHARS
    calls = []
    encode_batch = tokenizer.encode_batch
    monkeypatch.setattr(tokenizer, "encode_batch", lambda texts: calls.append(list(texts)) or encode_batch(texts))
    batch_chars = CHUNK_CHARS
    tokens = text_token_stream([huge, "tail"], tokenizer, batch_chars=batch_chars)
    assert tokens.dtype == np.int32
    assert tokens.tolist() == encode_batch([huge])[0] + [tokenizer.eos_id] + tokenizer.encode("tail") + [tokenizer.eos_id]
    assert len(calls) >= 4
    assert all(max(map(len, call)) <= CHUNK_CHARS and sum(map(len, call)) < batch_chars + CHUNK_CHARS for call in calls)
    packed = data_module.PackedDataset.from_texts([huge], tokenizer, seq_len=32)
    assert packed.tokens[0, :33].tolist() == tokens[:33].tolist()
