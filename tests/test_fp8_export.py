"""FP8 exports (SPEC §1.6, §3): which tensors are E4M3, their 128x128 scale_inv (the blocks training and FP8
rollouts use), the round trip, the CLI."""

import json

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file, save_file

from linglab.checkpoint import (
    CheckpointError,
    from_pretrained,
    hf_config_dict,
    load_config_json,
    save_pretrained,
    to_hf_state_dict,
)
from linglab.cli import main
from linglab.fp8 import Fp8Recipe, dequantize_blockwise, quantize_blockwise
from linglab.fp8_convert import convert_to_fp8, fp8_weight_names
from linglab.model import build_model
from linglab.rl.rollout import RolloutEngine

# Markers of the tensors SPEC §3 keeps in high precision, written apart from the predicate under test.
HIGH_PRECISION = ("word_embeddings", "lm_head", "norm.weight", "mlp.gate.weight", "mlp.gate.expert_bias", "eh_proj")
SHAPES = {
    "hidden 128": {},  # one 128 block along hidden; experts (64) have a partial block
    "partial blocks": dict(hidden_size=160, head_dim=24, intermediate_size=200, moe_intermediate_size=72),
}


@pytest.fixture(params=list(SHAPES), scope="module")
def exported(request, tmp_path_factory):
    model = build_model(tiny_config(num_hidden_layers=2, **SHAPES[request.param]).model, seed=5)
    with torch.no_grad():
        for moe in model.moe_layers():
            moe.gate.expert_bias.normal_()
    path = tmp_path_factory.mktemp("fp8") / "ckpt"
    save_pretrained(model, path, fp8=True)
    return model.eval(), path


def _fp8_hf_names(model) -> set[str]:
    """The HF names of `fp8_weight_names`, experts unstacked."""
    sd = model.state_dict()
    return set(to_hf_state_dict(model, {n: sd[n] for n in fp8_weight_names(model)}))


def test_file_holds_e4m3_for_exactly_the_fp8_weights_with_fp32_scale_inv(exported):
    model, path = exported
    c = model.cfg
    original = to_hf_state_dict(model)
    stored = load_file(str(path / "model.safetensors"))
    expected_fp8 = {n for n in original if not any(m in n for m in HIGH_PRECISION)}
    # attention (2) in 2 layers + MTP, one dense SwiGLU (3), experts and shared expert (3 each) in layer 1 + MTP
    assert len(expected_fp8) == 2 * 3 + 3 + 2 * 3 * (c.num_experts + 1)
    assert _fp8_hf_names(model) == expected_fp8
    assert {n for n, t in stored.items() if t.dtype == torch.float8_e4m3fn} == expected_fp8
    assert set(stored) == set(original) | {f"{n}_scale_inv" for n in expected_fp8}
    for name in expected_fp8:
        q, scale = quantize_blockwise(original[name])
        n, k = original[name].shape
        assert stored[f"{name}_scale_inv"].dtype == torch.float32
        assert stored[f"{name}_scale_inv"].shape == (-(-n // 128), -(-k // 128)), name
        assert torch.equal(stored[name].view(torch.uint8), q.view(torch.uint8)), name
        assert torch.equal(stored[f"{name}_scale_inv"], scale), name
    for name in set(original) - expected_fp8:
        assert stored[name].dtype == torch.float32 and torch.equal(stored[name], original[name]), name


def test_training_export_and_fp8_rollouts_use_the_same_gate_and_up_blocks(tmp_path):
    """FFN widths that are not multiples of 128 (200 dense, 72 experts and shared expert): blocks over [gate; up]
    would straddle the boundary. Training's dequantised gate/up weights, the export's E4M3 * scale_inv and the FP8
    rollout engine's weights are the same tensors, bit for bit."""
    cfg = tiny_config(num_hidden_layers=2, **SHAPES["partial blocks"]).model
    model = build_model(cfg, seed=3)
    save_pretrained(model, tmp_path / "fp8", fp8=True)
    stored = load_file(str(tmp_path / "fp8" / "model.safetensors"))
    exported = {n: dequantize_blockwise(q, stored[f"{n}_scale_inv"]) for n, q in stored.items()
                if f"{n}_scale_inv" in stored}
    engine = RolloutEngine(cfg, eos_id=0, max_new_tokens=1, precision="fp8")
    engine.sync_weights(model)
    rollout = to_hf_state_dict(engine.model)
    assert all(torch.equal(rollout[n], w) for n, w in exported.items())

    convert_to_fp8(model, Fp8Recipe(), "emulate")
    saved = []  # every tensor the FP8 GEMMs keep for backward, the dequantised weights among them
    ids = torch.randint(0, cfg.vocab_size, (2, 17))
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        model(ids[:, :-1], targets=ids[:, 1:])

    def trained_with(w: torch.Tensor) -> bool:
        return any(t.shape == w.shape and torch.equal(t, w) for t in saved)

    def gate_up(prefix: str) -> torch.Tensor:
        return torch.cat([exported[f"{prefix}.gate_proj.weight"], exported[f"{prefix}.up_proj.weight"]])

    for layer in (1, 2):  # the MoE layer and the MTP layer (HF index num_hidden_layers)
        prefix = f"model.layers.{layer}.mlp"
        experts = torch.stack([gate_up(f"{prefix}.experts.{e}") for e in range(cfg.num_experts)])
        assert trained_with(experts.transpose(1, 2)), f"{prefix}.experts"  # the grouped GEMM's [E, in, out]
        assert trained_with(gate_up(f"{prefix}.shared_experts")), f"{prefix}.shared_experts"
    assert trained_with(gate_up("model.layers.0.mlp")), "dense FFN"
    # The check has teeth: one block grid over [gate; up] gives other weights.
    shared = model.model.layers[1].mlp.shared_experts
    fused = dequantize_blockwise(*quantize_blockwise(torch.cat([shared.gate_proj.weight, shared.up_proj.weight])))
    assert not torch.equal(fused, gate_up("model.layers.1.mlp.shared_experts"))


def test_config_json_gains_quantization_config_only(exported):
    model, path = exported
    d = json.loads((path / "config.json").read_text())
    assert d.pop("quantization_config") == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                            "weight_block_size": [128, 128]}
    assert d == hf_config_dict(model.cfg)
    assert load_config_json(path) == model.cfg  # quantization_config is not an unknown-key error


def test_reload_is_the_quantised_model(exported):
    model, path = exported
    loaded = from_pretrained(path).eval()
    original, reloaded, fp8 = to_hf_state_dict(model), to_hf_state_dict(loaded), _fp8_hf_names(model)
    assert original.keys() == reloaded.keys()
    for name, w in original.items():
        want = dequantize_blockwise(*quantize_blockwise(w)) if name in fp8 else w
        assert reloaded[name].dtype == torch.float32 and torch.equal(reloaded[name], want), name
    ids = torch.randint(0, model.cfg.vocab_size, (2, 16))
    ref, got = model(ids), loaded(ids)
    assert ((got - ref).norm() / ref.norm()).item() < 0.05


def test_fp8_export_is_smaller(exported, tmp_path):
    model, path = exported
    save_pretrained(model, tmp_path / "fp32")
    assert (path / "model.safetensors").stat().st_size < 0.5 * (tmp_path / "fp32" / "model.safetensors").stat().st_size


def _edit_tensors(path, edit):
    sd = load_file(str(path / "model.safetensors"))
    edit(sd)
    save_file(sd, str(path / "model.safetensors"))


def _copy(path, dst):
    import shutil

    shutil.copytree(path, dst)
    return dst


QKV = "model.layers.0.attention.query_key_value.weight"


@pytest.mark.parametrize("edit, message", [
    (lambda sd: sd.pop(f"{QKV}_scale_inv"), f"{QKV} is float8_e4m3fn but has no {QKV}_scale_inv"),
    (lambda sd: sd.update({f"{QKV}_scale_inv": torch.ones(5, 5)}), rf"{QKV}_scale_inv has shape \(5, 5\), expected \(2, "),
    (lambda sd: sd.update({QKV: sd[QKV].float()}), f"{QKV} has a _scale_inv but is a torch.float32 tensor"),
    (lambda sd: sd.pop(QKV), f"{QKV}_scale_inv has no weight {QKV}"),
])
def test_bad_scales_are_one_line_errors_naming_the_tensor(exported, tmp_path, edit, message):
    _, path = exported
    bad = _copy(path, tmp_path / "bad")
    _edit_tensors(bad, edit)
    with pytest.raises(CheckpointError, match=message) as e:
        from_pretrained(bad)
    assert "\n" not in str(e.value)


def test_quantization_config_is_required_and_checked(exported, tmp_path):
    _, path = exported
    bad = _copy(path, tmp_path / "bad")
    d = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({k: v for k, v in d.items() if k != "quantization_config"}))
    with pytest.raises(CheckpointError, match="float8_e4m3fn but config.json has no quantization_config"):
        from_pretrained(bad)
    for key, value, message in [("quant_method", "gptq", "quant_method 'gptq' is not supported"),
                                ("weight_block_size", [128, 64], "expected square blocks")]:
        (bad / "config.json").write_text(json.dumps(d | {"quantization_config": d["quantization_config"] | {key: value}}))
        with pytest.raises(CheckpointError, match=message):
            from_pretrained(bad)


def test_cli_export_round_trip(tmp_path, capsys):
    model = build_model(tiny_config(num_hidden_layers=2).model, seed=1)
    src, fp8, back = tmp_path / "src", tmp_path / "fp8", tmp_path / "back"
    save_pretrained(model, src)
    (src / "tokenizer.json").write_text('{"stand-in": true}')

    assert main(["export", "--ckpt", str(src), "--out", str(fp8), "--fp8"]) == 0
    out = capsys.readouterr().out
    assert str(fp8) in out and "MB ->" in out
    assert (fp8 / "tokenizer.json").read_text() == '{"stand-in": true}'
    assert "quantization_config" in json.loads((fp8 / "config.json").read_text())
    quantised = to_hf_state_dict(from_pretrained(fp8))

    # Without --fp8 an FP8 export is re-saved in fp32, dequantised: the same weights, no scales, no quantization_config.
    assert main(["export", "--ckpt", str(fp8), "--out", str(back)]) == 0
    stored = load_file(str(back / "model.safetensors"))
    assert stored.keys() == quantised.keys() and all(t.dtype == torch.float32 for t in stored.values())
    assert all(torch.equal(stored[k], quantised[k]) for k in stored)
    assert "quantization_config" not in json.loads((back / "config.json").read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["back", "fp8", "src"]  # no temp dirs left behind


def test_cli_export_refuses_to_overwrite_and_bad_checkpoints(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    save_pretrained(build_model(tiny_config(num_hidden_layers=1).model, seed=2), src)
    out.mkdir()
    (out / "keep.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    bad_scale = tmp_path / "bad_scale"
    save_pretrained(build_model(tiny_config(num_hidden_layers=1).model, seed=2), bad_scale, fp8=True)
    _edit_tensors(bad_scale, lambda sd: sd.pop(f"{QKV}_scale_inv"))
    for argv, message in [
        (["--ckpt", str(src), "--out", str(out), "--fp8"], "exists and is not empty (pass --overwrite"),
        (["--ckpt", str(tmp_path / "nope"), "--out", str(tmp_path / "o1")], "is not a directory"),
        (["--ckpt", str(tmp_path / "empty"), "--out", str(tmp_path / "o2")], "missing config.json"),
        (["--ckpt", str(bad_scale), "--out", str(tmp_path / "o3")], f"has no {QKV}_scale_inv"),
    ]:
        assert main(["export", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert (out / "keep.txt").is_file() and not (tmp_path / "o3").exists()
    assert main(["export", "--ckpt", str(src), "--out", str(out), "--fp8", "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
