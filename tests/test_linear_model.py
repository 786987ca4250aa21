"""The Ring-linear hybrid (BailingMoeLinearV2, SPEC §8) in the model: layer kinds, the linear layer against the plain
oracle, decoding with the mixed cache, checkpoints of both families, the presets' counts, training and FP8."""

import json

import pytest
import torch
from conftest import decode_in_parts, randomize
from reference_bailing import forward_ref
from safetensors.torch import load_file

from linglab.checkpoint import CheckpointError, from_pretrained, hf_config_dict, save_pretrained, to_hf_state_dict
from linglab.cli import main
from linglab.config import ConfigError, load_config
from linglab.fp8 import Fp8Recipe
from linglab.fp8_convert import Fp8Linear, convert_to_fp8, fp8_weight_names
from linglab.generate import generate
from linglab.model import Attention, KVCache, LinearAttention, build_model, count_parameters

LINEAR_KEYS = ("layer_group_size", "group_norm_size", "linear_silu")


def hybrid_config(*overrides: str):
    return load_config("tiny-linear", overrides=list(overrides)).model


def random_hybrid(*overrides: str):
    """tiny-linear (layers 0, 2 linear; 1, 3 softmax) with weights large enough that every part matters."""
    return randomize(build_model(hybrid_config(*overrides), seed=0))


def softmax_layers(cfg) -> list[int]:
    return [i for i in range(cfg.num_hidden_layers) if cfg.layer_kind(i) == "softmax"]


def test_layer_kind_rule():
    mini = load_config("ring-mini-linear-2.0").model
    assert softmax_layers(mini) == [4, 9, 14, 19] and mini.is_linear
    assert softmax_layers(load_config("ring-flash-linear-2.0").model) == [7, 15, 23, 31]
    assert softmax_layers(hybrid_config()) == [1, 3]
    # A trailing partial group is softmax: 22 layers in groups of 5.
    assert softmax_layers(hybrid_config("--model.num_hidden_layers=22", "--model.layer_group_size=5")) == [
        4, 9, 14, 19, 20, 21]
    plain = load_config("tiny").model
    assert softmax_layers(plain) == [0, 1, 2, 3] and not plain.is_linear
    # The MTP layer (index num_hidden_layers) is softmax in every hybrid.
    for cfg in (mini, hybrid_config(), hybrid_config("--model.layer_group_size=3")):
        assert cfg.layer_kind(cfg.num_hidden_layers) == "softmax"
    model = build_model(hybrid_config(), device="meta")
    kinds = [type(layer.attention) for layer in [*model.model.layers, *model.model.mtp_layers]]
    assert kinds == [LinearAttention, Attention, LinearAttention, Attention, Attention]


@pytest.mark.parametrize("overrides", [
    (),  # tiny-linear as it trains: RoPE on the whole head
    ("--model.partial_rotary_factor=0.5", "--model.linear_silu=true", "--model.group_norm_size=4"),
])
def test_logits_match_plain_reference(overrides):
    model = random_hybrid(*overrides)
    sd = to_hf_state_dict(model)
    cfg = json.loads(json.dumps(hf_config_dict(model.cfg)))
    ids = torch.randint(0, model.cfg.vocab_size, (1, 13))
    with torch.no_grad():
        out = model(ids[:, :-1], targets=ids[:, 1:])
    ref_logits, ref_mtp = forward_ref(ids[0, :-1].tolist(), sd, cfg)
    assert (out.logits[0] - ref_logits).abs().max() <= 1e-4
    assert torch.allclose(out.mtp_loss, torch.nn.functional.cross_entropy(ref_mtp, ids[0, 2:]), atol=1e-4)


def test_several_chunks_match_the_reference():
    model = random_hybrid("--model.num_hidden_layers=2", "--model.num_nextn_predict_layers=0")
    ids = torch.randint(0, model.cfg.vocab_size, (1, 70))  # > 64: the chunked form carries state across chunks
    with torch.no_grad():
        logits = model(ids)
    ref, _ = forward_ref(ids[0].tolist(), to_hf_state_dict(model), json.loads(json.dumps(hf_config_dict(model.cfg))))
    assert (logits[0] - ref).abs().max() <= 1e-4


def test_mixed_cache_decoding_equals_full_forward():
    model = random_hybrid()
    decoded, full, cache = decode_in_parts(model, torch.randint(0, model.cfg.vocab_size, (3, 20)))
    assert torch.allclose(decoded, full, atol=1e-5)
    # K/V for the two softmax layers only; a fixed hd x hd state for each of the two linear layers.
    cfg = model.cfg
    assert cache.k.shape == (2, 3, cfg.num_key_value_heads, 20, cfg.head_dim)
    assert cache.state.shape == (2, 3, cfg.num_attention_heads, cfg.head_dim, cfg.head_dim)
    longer = KVCache(cfg, batch_size=3, max_len=40)
    assert longer.nbytes() - cache.nbytes() == cache.k.nbytes + cache.v.nbytes  # only K/V grow with the context


def test_left_padded_batch_decodes_as_each_row_alone():
    model = random_hybrid()
    prompts = [torch.randint(2, model.cfg.vocab_size, (n,)).tolist() for n in (2, 7, 4)]
    width = max(map(len, prompts))
    pad = torch.tensor([width - len(p) for p in prompts])
    batch = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    with torch.no_grad():
        padded = model(batch, pad=pad)
        for b, p in enumerate(prompts):
            torch.testing.assert_close(padded[b, pad[b]:], model(torch.tensor([p]))[0], rtol=1e-4, atol=1e-5)
    cached = generate(model, prompts, 6, eos_id=-1, temperature=0.0)
    assert cached.tokens == generate(model, prompts, 6, eos_id=-1, temperature=0.0, use_cache=False).tokens
    assert cached.tokens == [generate(model, [p], 6, eos_id=-1, temperature=0.0).tokens[0] for p in prompts]
    # Logits too: the cached decode of the batch equals the full forward of the batch with its samples appended.
    seq = torch.cat([batch, torch.tensor(cached.tokens)], dim=1)
    with torch.no_grad():
        full = model(seq, pad=pad)
        cache = KVCache(model.cfg, 3, seq.shape[1])
        parts = [model(seq[:, :width], cache=cache, pad=pad)]
        parts += [model(seq[:, t:t + 1], cache=cache, pad=pad) for t in range(width, seq.shape[1])]
    for b in range(3):
        torch.testing.assert_close(torch.cat(parts, dim=1)[b, pad[b]:], full[b, pad[b]:], rtol=1e-4, atol=1e-5)


def test_save_load_bit_exact_and_config_json(tmp_path):
    model = random_hybrid()
    save_pretrained(model, tmp_path / "ckpt")
    d = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert d["architectures"] == ["BailingMoeLinearV2ForCausalLM"] and d["model_type"] == "bailing_moe_linear"
    assert (d["layer_group_size"], d["group_norm_size"], d["linear_silu"]) == (2, 2, False)
    loaded = from_pretrained(tmp_path / "ckpt")
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(ids), loaded(ids))
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), "pt") as f:
        shape = lambda n: tuple(f.get_slice(n).get_shape())  # noqa: E731
        width, hidden = model.cfg.num_attention_heads * model.cfg.head_dim, model.cfg.hidden_size
        assert shape("model.layers.0.attention.query_key_value.weight") == (3 * width, hidden)  # full-head K/V
        assert shape("model.layers.0.attention.g_proj.weight") == (width, hidden)
        assert shape("model.layers.0.attention.g_norm.weight") == (width,)
        assert shape("model.layers.0.attention.dense.weight") == (hidden, width)
        assert "model.layers.1.attention.g_proj.weight" not in f.keys()  # softmax layer: SPEC §1.3 tensors
        assert "model.layers.4.attention.g_proj.weight" not in f.keys()  # the MTP layer is softmax


def test_softmax_family_config_json_is_unchanged_and_families_are_checked(tmp_path):
    plain = hf_config_dict(load_config("tiny").model)
    assert plain["model_type"] == "bailing_moe" and not set(LINEAR_KEYS) & set(plain)
    assert list(plain)[-1] == "eos_token_id"  # the BailingMoeV2 keys in their order, nothing after them
    save_pretrained(random_hybrid(), tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "config.json"
    good = json.loads(path.read_text())
    for edit, message in [
        (lambda d: d.pop("group_norm_size"), "missing key group_norm_size"),
        (lambda d: d.update(layer_group_size=0), "layer_group_size is 0; bailing_moe_linear needs >= 1"),
        (lambda d: d.update(architectures=["BailingMoeV2ForCausalLM"]), "architectures is"),
        (lambda d: d.update(model_type="qwen3_next"), "model_type is 'qwen3_next'"),
        (lambda d: d.update(group_norm_size=3), "group_norm_size (3) must divide"),
    ]:
        d = dict(good)
        edit(d)
        path.write_text(json.dumps(d))
        with pytest.raises(CheckpointError, match="^checkpoint .*config.json: ") as e:
            from_pretrained(tmp_path / "ckpt")
        assert message in str(e.value) and "\n" not in str(e.value)


def test_hybrid_config_errors_are_one_line():
    with pytest.raises(ConfigError, match="model.layer_group_size must be >= 0"):
        hybrid_config("--model.layer_group_size=-1")
    with pytest.raises(ConfigError, match="model.head_dim .* must equal hidden_size"):
        hybrid_config("--model.head_dim=16")
    hybrid_config("--model.layer_group_size=0", "--model.head_dim=16")  # all softmax: any head_dim, as before


@pytest.mark.parametrize("preset, total, active, active_non_embedding", [
    ("ring-mini-linear-2.0", 16.42, 1.60, 0.957),  # SPEC §8: 16.4B, 1.6B, 957M
    ("ring-flash-linear-2.0", 104.18, 7.44, 6.157),  # published 104B and 6.1B activations (docs/linear.md)
])
def test_preset_param_counts(preset, total, active, active_non_embedding, capsys):
    c = count_parameters(build_model(load_config(preset).model, device="meta"))
    assert round(c.total / 1e9, 2) == total and round(c.active / 1e9, 2) == active
    assert round(c.active_non_embedding / 1e9, 3) == active_non_embedding
    assert main(["params", "--preset", preset]) == 0
    out = capsys.readouterr().out
    assert f"{c.total:,}" in out and f"{c.active_non_embedding:,}" in out


def test_mini_adds_full_head_kv_and_g_proj_to_ling_mini():
    ling = count_parameters(build_model(load_config("ling-mini-2.0").model, device="meta"))
    ring = count_parameters(build_model(load_config("ring-mini-linear-2.0").model, device="meta"))
    per_layer = (16 + 2 * 16 - (16 + 2 * 4)) * 128 * 2048 + 2048 * 2048 + 2048  # K/V rows, g_proj, g_norm
    assert ring.total - ling.total == ring.active - ling.active == 16 * per_layer


def test_train_tiny_linear_through_the_cli_and_load_its_checkpoint(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--preset", "tiny-linear", "--out", str(out), "--train.max_steps=3", "--train.ckpt_every=3",
                 "--train.batch_size=4", "--data.seq_len=32", "--data.num_documents=300", "--train.eval_problems=2",
                 "--train.num_samples=1", "--train.eval_every=0", "--train.warmup_steps=1"]) == 0
    report = (out / "report.md").read_text()  # the softmax report's sections (test_report), naming the layers
    assert "| architecture | BailingMoeLinearV2" in report and "linear attention at 0, 2, softmax at 1, 3" in report
    model = from_pretrained(out / "final")
    assert model.cfg.layer_group_size == 2 and isinstance(model.model.layers[0].attention, LinearAttention)
    assert torch.isfinite(model(torch.randint(0, model.cfg.vocab_size, (1, 8)))).all()


def test_fp8_covers_the_linear_layers_and_a_step_trains(tmp_path):
    save_pretrained(random_hybrid(), tmp_path / "fp8", fp8=True)  # the export quantises what training runs in FP8
    names = set(load_file(str(tmp_path / "fp8" / "model.safetensors")))
    assert {f"model.layers.0.attention.{p}.weight_scale_inv" for p in ("query_key_value", "g_proj", "dense")} <= names
    assert "model.layers.0.attention.g_norm.weight_scale_inv" not in names
    assert from_pretrained(tmp_path / "fp8").cfg.is_linear

    model = random_hybrid().train()
    names = convert_to_fp8(model, Fp8Recipe(), "emulate")
    for i in (0, 2):
        for p in ("query_key_value", "g_proj", "dense"):
            assert f"model.layers.{i}.attention.{p}" in names
            assert type(getattr(model.model.layers[i].attention, p)) is Fp8Linear
        assert f"model.layers.{i}.attention.g_proj.weight" in fp8_weight_names(model)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 17))
    out = model(ids[:, :-1], targets=ids[:, 1:])
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert model.model.layers[0].attention.g_proj.weight.grad.abs().sum() > 0
