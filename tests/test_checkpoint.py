"""HF-format checkpoints (SPEC §1.6): names, config keys, bit-exact round trip, one-line errors."""

import json

import pytest
import torch
from conftest import tiny_config

from linglab.checkpoint import CheckpointError, from_pretrained, save_pretrained
from linglab.model import build_model

REQUIRED_CONFIG_KEYS = """vocab_size hidden_size intermediate_size num_hidden_layers num_attention_heads
num_key_value_heads head_dim hidden_act rms_norm_eps max_position_embeddings rope_theta rope_scaling
partial_rotary_factor tie_word_embeddings use_bias use_qkv_bias use_qk_norm num_experts num_shared_experts
num_experts_per_tok n_group topk_group moe_intermediate_size first_k_dense_replace routed_scaling_factor
norm_topk_prob score_function router_dtype moe_router_enable_expert_bias num_nextn_predict_layers
mtp_loss_scaling_factor pad_token_id eos_token_id""".split()


@pytest.fixture
def saved(tmp_path):
    model = build_model(tiny_config(num_hidden_layers=2).model, seed=3)
    with torch.no_grad():
        model.moe_layers()[0].gate.expert_bias.normal_()
    save_pretrained(model, tmp_path / "ckpt")
    return model, tmp_path / "ckpt"


def test_config_json_has_the_exact_hf_keys(saved):
    _, path = saved
    d = json.loads((path / "config.json").read_text())
    assert d["architectures"] == ["BailingMoeV2ForCausalLM"] and d["model_type"] == "bailing_moe"
    for key in REQUIRED_CONFIG_KEYS:
        assert key in d, key
    assert d["rope_scaling"] is None and d["tie_word_embeddings"] is False and d["score_function"] == "sigmoid"


def test_tensor_names_and_layouts(saved):
    from safetensors import safe_open

    model, path = saved
    c = model.cfg
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        shape = lambda n: tuple(f.get_slice(n).get_shape())  # noqa: E731
        dtype = lambda n: f.get_slice(n).get_dtype()  # noqa: E731
        assert {"model.word_embeddings.weight", "model.norm.weight", "lm_head.weight"} <= names
        qkv = (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim
        assert shape("model.layers.0.attention.query_key_value.weight") == (qkv, c.hidden_size)
        assert shape("model.layers.0.attention.query_layernorm.weight") == (c.head_dim,)
        assert shape("model.layers.0.mlp.gate_proj.weight") == (c.intermediate_size, c.hidden_size)
        assert shape("model.layers.1.mlp.gate.weight") == (c.num_experts, c.hidden_size)
        assert dtype("model.layers.1.mlp.gate.expert_bias") == "F32"
        for e in range(c.num_experts):
            assert shape(f"model.layers.1.mlp.experts.{e}.down_proj.weight") == (c.hidden_size, c.moe_intermediate_size)
        assert shape("model.layers.1.mlp.shared_experts.up_proj.weight") == (c.moe_intermediate_size, c.hidden_size)
        mtp = f"model.layers.{c.num_hidden_layers}"
        assert shape(f"{mtp}.eh_proj.weight") == (c.hidden_size, 2 * c.hidden_size)
        for n in ("enorm", "hnorm", "final_layernorm", "input_layernorm"):
            assert f"{mtp}.{n}.weight" in names
        assert f"{mtp}.mlp.experts.0.gate_proj.weight" in names
        assert not any("mtp_layers" in n or "tokens_per_expert" in n for n in names)


def test_save_load_is_bit_exact(saved):
    model, path = saved
    loaded = from_pretrained(path)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ids = torch.randint(0, model.cfg.vocab_size, (2, 10))
    assert torch.equal(model.eval()(ids), loaded.eval()(ids))
    # Materialised empty, not initialised: the non-persistent load counters must still start at zero.
    loads = [m.tokens_per_expert for m in from_pretrained(path).moe_layers()]
    assert loads and all(not load.any() for load in loads)


def test_save_replaces_atomically_and_leaves_no_temp_dirs(saved, tmp_path):
    model, path = saved
    save_pretrained(model, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_missing_checkpoint_is_one_line_error(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="missing config.json"):
        from_pretrained(tmp_path / "empty")


def test_corrupted_safetensors_is_one_line_error(saved):
    _, path = saved
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupted"):
        from_pretrained(path)
    (path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="corrupted"):
        from_pretrained(path)


def test_checkpoint_of_another_shape_names_the_tensor(saved):
    _, path = saved
    d = json.loads((path / "config.json").read_text())
    d["moe_intermediate_size"] = 32
    (path / "config.json").write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match=r"experts.* has shape \((64, 128|128, 64)\), the model expects \((32, 128|128, 32)\)"):
        from_pretrained(path)


def test_bad_config_json_is_one_line_error(saved):
    _, path = saved
    (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        from_pretrained(path)
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="model_type"):
        from_pretrained(path)
