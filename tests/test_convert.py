"""`linglab convert --to linear` (SPEC §8) and `train --init-from`: shared tensors bit-identical, GQA rows expanded,
the output a loadable hybrid whose softmax layers compute what they did, one-line errors (exit 2)."""

import json

import pytest
import torch

from linglab.checkpoint import from_pretrained, load_hf_tensors, save_pretrained
from linglab.cli import main
from linglab.config import load_config
from linglab.convert import convert_to_linear, expand_gqa_rows
from linglab.model import Attention, build_model, rope_cos_sin
from linglab.train import run_training

TWO_LAYERS = ["--model.num_hidden_layers=2"]  # group of 2: layer 0 linear, layer 1 (and the MTP layer) softmax
FAST = ["--train.batch_size=8", "--data.seq_len=64", "--data.num_documents=1500", "--train.eval_problems=4",
        "--train.num_samples=0", "--train.eval_every=0", "--train.warmup_steps=1", *TWO_LAYERS]


@pytest.fixture(scope="module")
def converted(tmp_path_factory, one_thread):
    """(source checkpoint, converted checkpoint) of a randomly initialised 2-layer tiny BailingMoeV2."""
    root = tmp_path_factory.mktemp("convert")
    model = build_model(load_config("tiny", overrides=TWO_LAYERS).model, seed=1)
    for layer in model.moe_layers():  # nonzero expert biases, so copying them is tested
        layer.gate.expert_bias.normal_()
    save_pretrained(model, root / "src")
    convert_to_linear(root / "src", root / "hybrid", layer_group_size=2, group_norm_size=2)
    return root / "src", root / "hybrid"


def test_shared_tensors_bit_identical_and_new_ones_initialised(converted):
    src, out = (load_hf_tensors(p) for p in converted)
    linear_qkv = "model.layers.0.attention.query_key_value.weight"
    new = {"model.layers.0.attention.g_proj.weight", "model.layers.0.attention.g_norm.weight"}
    assert set(out) == set(src) | new
    for name, t in src.items():
        if name != linear_qkv:
            assert torch.equal(out[name], t), name
    assert any("expert_bias" in name for name in src)
    assert torch.equal(out["model.layers.0.attention.g_proj.weight"], torch.zeros(128, 128))
    assert torch.equal(out["model.layers.0.attention.g_norm.weight"], torch.ones(128))


def test_kv_rows_are_the_repeated_gqa_rows(converted):
    src, out = (load_hf_tensors(p)["model.layers.0.attention.query_key_value.weight"] for p in converted)
    nh, nkv, hd = 4, 2, 32
    q, k, v = src.split([nh * hd, nkv * hd, nkv * hd])
    q2, k2, v2 = out.split(nh * hd)
    assert torch.equal(q2, q)
    for h in range(nh):  # query head h used K/V head h // (nh / nkv)
        j = h // (nh // nkv)
        assert torch.equal(k2[h * hd:(h + 1) * hd], k[j * hd:(j + 1) * hd])
        assert torch.equal(v2[h * hd:(h + 1) * hd], v[j * hd:(j + 1) * hd])


def test_expanded_rows_compute_what_gqa_computed(one_thread):
    """The expansion is the GQA pairing: full-head softmax attention on the expanded rows equals the GQA layer."""
    gqa_cfg = load_config("tiny").model
    full_cfg = load_config("tiny", overrides=["--model.num_key_value_heads=4"]).model
    gqa, full = Attention(gqa_cfg, 0), Attention(full_cfg, 0)
    full.load_state_dict(gqa.state_dict() | {
        "query_key_value.weight": expand_gqa_rows(gqa.query_key_value.weight, 4, 2, 32)})
    x = torch.randn(2, 9, 128)
    cos, sin = rope_cos_sin(gqa_cfg.rope_dim, gqa_cfg.rope_theta, torch.arange(9))
    torch.testing.assert_close(full(x, cos, sin), gqa(x, cos, sin))


def test_output_loads_as_hybrid_and_softmax_layers_compute_the_same(converted):
    src_dir, out_dir = converted
    config = json.loads((out_dir / "config.json").read_text())
    assert config["architectures"] == ["BailingMoeLinearV2ForCausalLM"]
    assert config["model_type"] == "bailing_moe_linear"
    assert (config["layer_group_size"], config["group_norm_size"], config["linear_silu"]) == (2, 2, False)
    src, hybrid = from_pretrained(src_dir), from_pretrained(out_dir)
    assert [hybrid.cfg.layer_kind(i) for i in range(2)] == ["linear", "softmax"]
    assert type(hybrid.model.layers[0].attention).__name__ == "LinearAttention"

    x = torch.randn(2, 12, 128)
    cos, sin = rope_cos_sin(src.cfg.rope_dim, src.cfg.rope_theta, torch.arange(12))
    with torch.no_grad():
        for a, b in ((src.model.layers[1], hybrid.model.layers[1]), (src.model.mtp_layers[0], hybrid.model.mtp_layers[0])):
            if a is src.model.mtp_layers[0]:
                torch.testing.assert_close(b(x, x, cos, sin)[0], a(x, x, cos, sin)[0], rtol=0, atol=0)
            else:
                torch.testing.assert_close(b(x, cos, sin)[0], a(x, cos, sin)[0], rtol=0, atol=0)
        ids = torch.randint(0, 512, (2, 12))
        assert torch.isfinite(hybrid(ids)).all()


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("args, message", [
    (["--layer-group-size", "1"], "leaves no layer linear"),
    (["--layer-group-size", "3"], "leaves no layer linear"),
    (["--layer-group-size", "2", "--group-norm-size", "3"], "group_norm_size"),
])
def test_cli_refuses_shapes_the_rule_cannot_take(converted, tmp_path, capsys, args, message):
    assert main(["convert", "--to", "linear", "--ckpt", str(converted[0]), "--out", str(tmp_path / "o"), *args]) == 2
    assert message in _error_line(capsys)
    assert not (tmp_path / "o").exists()


def test_cli_refuses_hybrid_input_bad_head_width_and_existing_out(converted, tmp_path, capsys):
    src, hybrid = converted
    assert main(["convert", "--to", "linear", "--ckpt", str(hybrid), "--out", str(tmp_path / "o"),
                 "--layer-group-size", "2"]) == 2
    assert "already a hybrid" in _error_line(capsys)

    narrow = tmp_path / "narrow"  # 4 heads x 16 != hidden 128: a linear layer's head_dim is hidden / heads
    save_pretrained(build_model(load_config("tiny", overrides=[*TWO_LAYERS, "--model.head_dim=16"]).model), narrow)
    assert main(["convert", "--to", "linear", "--ckpt", str(narrow), "--out", str(tmp_path / "o"),
                 "--layer-group-size", "2"]) == 2
    assert "must equal hidden_size" in _error_line(capsys)
    assert not (tmp_path / "o").exists()

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    assert main(["convert", "--to", "linear", "--ckpt", str(src), "--out", str(taken), "--layer-group-size", "2"]) == 2
    assert "--overwrite" in _error_line(capsys)
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]
    assert main(["convert", "--to", "linear", "--ckpt", str(src), "--out", str(taken), "--layer-group-size", "2",
                 "--group-norm-size", "2", "--overwrite"]) == 0
    assert from_pretrained(taken).cfg.is_linear


def test_train_init_from_converted_then_resume_keeps_its_own_checkpoints(converted, tmp_path, capsys):
    src, hybrid = converted
    run = tmp_path / "run"
    cfg = load_config("tiny-linear", overrides=[*FAST, "--train.max_steps=2", "--train.ckpt_every=1",
                                                "--train.lr=1e-9", "--train.bias_update_rate=0",
                                                "--train.schedule=wsm"])  # a WSM run may be extended
    summary = run_training(cfg, run, init_from=hybrid)
    assert summary["steps"] == 2 and summary["init_from"] == str(hybrid)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[0] == {"kind": "init", "step": 0, "from": str(hybrid)}
    start, final = load_hf_tensors(hybrid), load_hf_tensors(run / "final")
    for name in ("model.word_embeddings.weight", "model.layers.0.attention.query_key_value.weight",
                 "model.layers.1.mlp.gate.expert_bias"):  # an LR of 1e-9 for 2 steps leaves the start's weights
        torch.testing.assert_close(final[name], start[name], rtol=0, atol=1e-6)

    # A resume with checkpoints of its own never reads --init-from: not even one of another shape.
    assert main(["train", "--out", str(run), "--resume", "--init-from", str(src), "--train.max_steps=3"]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in rows].count("init") == 1
    assert max(r["step"] for r in rows if r["kind"] == "train") == 3


def test_train_init_from_another_shape_is_one_line_and_writes_nothing(converted, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--init-from", str(converted[1]), "--out", str(out), *FAST]) == 2
    assert "model.layer_group_size=2" in _error_line(capsys)
    assert not out.exists()
    assert main(["train", "--preset", "tiny-linear", "--init-from", str(converted[1]), "--out", str(out), *FAST,
                 "--model.num_hidden_layers=4"]) == 2
    assert "num_hidden_layers" in _error_line(capsys)
    assert not out.exists()
